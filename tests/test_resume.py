"""No lost work: a run stopped by SIGTERM or killed by SIGKILL resumes from its last complete checkpoint and
continues with exactly the losses of an uninterrupted run (LoRA dropout on, mid-epoch, data order kept).
Uses the tiny LLaMA of conftest.py in 4-bit, so each run takes seconds."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12


def command(model_dir, out, *extra):
    return [sys.executable, os.path.join(ROOT, "finetune.py"), "--base_model", model_dir,
            "--data_path", os.path.join(ROOT, "dataset", "sample.json"), "--output_dir", str(out),
            "--max_steps", str(STEPS), "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
            "--lora_dropout", "0.3", "--learning_rate", "1e-3", "--logging_steps", "1", "--cutoff_len", "128",
            "--seed", "3", *extra]


def losses(out):
    summary = json.loads((out / "training_summary.json").read_text())
    return dict((step, loss) for step, loss in summary["loss_history"])


def run_until(cmd, marker_count, sig):
    """Start training, send `sig` once `marker_count` optimizer steps have logged a loss; return the process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    seen, output, deadline = 0, [], time.time() + 300
    for line in proc.stdout:  # the Trainer prints one {'loss': ...} line per logged step
        output.append(line)
        seen += line.count("'loss'")
        if seen >= marker_count:
            proc.send_signal(sig)
            break
        assert time.time() < deadline, "".join(output)
    rest, _ = proc.communicate(timeout=300)
    return proc.returncode, "".join(output) + rest


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    proc = subprocess.run(command(tiny_llama_dir, out), capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = losses(out)
    assert sorted(ref) == list(range(1, STEPS + 1))
    return ref


def test_sigterm_saves_and_resume_is_exact(tiny_llama_dir, reference, tmp_path):
    out = tmp_path / "run"
    code, log = run_until(command(tiny_llama_dir, out, "--save_steps", "1000"), 5, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, log[-3000:]
    assert "Traceback" not in log and "--resume_from_checkpoint latest" in log
    saved = [d for d in os.listdir(out) if d.startswith("checkpoint-")]
    assert len(saved) == 1 and saved[0] != "checkpoint-final", saved  # only the stop's checkpoint
    stopped_at = int(saved[0].split("-")[1])
    assert 5 <= stopped_at < STEPS

    proc = subprocess.run(command(tiny_llama_dir, out, "--save_steps", "1000", "--resume_from_checkpoint", "latest"),
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = losses(out)
    after = range(stopped_at + 1, STEPS + 1)
    assert [resumed[s] for s in after] == pytest.approx([reference[s] for s in after], abs=1e-6)


def test_sigkill_resumes_from_last_complete_checkpoint(tiny_llama_dir, reference, tmp_path):
    out = tmp_path / "run"
    code, _ = run_until(command(tiny_llama_dir, out, "--save_steps", "3"), 8, signal.SIGKILL)
    assert code == -signal.SIGKILL
    # simulate the worst case too: a newer checkpoint torn halfway through writing
    torn = out / "checkpoint-11"
    torn.mkdir()
    (torn / "adapter_model.safetensors").write_bytes(b"\x00" * 10)

    proc = subprocess.run(command(tiny_llama_dir, out, "--save_steps", "3", "--resume_from_checkpoint", "latest",
                                  "--save_total_limit", "1"), capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipping incomplete checkpoint" in proc.stdout and "checkpoint-11" in proc.stdout
    resumed_from = int(proc.stdout.split("resuming from ")[1].split("checkpoint-")[1].split()[0])
    assert resumed_from in (6, 9)
    resumed = losses(out)
    after = range(resumed_from + 1, STEPS + 1)
    assert [resumed[s] for s in after] == pytest.approx([reference[s] for s in after], abs=1e-6)
    # rotation by step with --save_total_limit 1: the torn checkpoint and the older ones are gone
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == ["checkpoint-12", "checkpoint-final"]
