"""`torchrun --nproc_per_node=2 finetune.py` unchanged, on the CPU (gloo), 4-bit tiny LLaMA: it finishes,
prints the effective batch once, only rank 0 writes one set of checkpoints, and its losses match a
single-process run with the same global batch."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_torchrun_two_processes(tiny_llama_dir, tmp_path, free_port):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           os.path.join(ROOT, "finetune.py"), "--base_model", tiny_llama_dir, "--output_dir", str(out),
           "--max_steps", "4", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
           "--save_steps", "2", "--cutoff_len", "128"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert log.count("effective batch size: 2 process(es) x 2 micro-batch x 1 accumulation = 4") == 1
    assert log.count("final adapter:") == 1
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == \
        ["checkpoint-2", "checkpoint-4", "checkpoint-final"]
    assert not list(out.glob("checkpoint-final.tmp*"))
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["global_step"] == 4 and len(summary["loss_history"]) == 4
    meta = json.loads((out / "checkpoint-final" / "training_meta.json").read_text())
    assert meta["bits"] == 4


def test_two_processes_match_one_process_with_the_same_global_batch(tiny_llama_dir, tmp_path, free_port):
    """8 records and a global batch of 8, so every step sees every record in both runs whatever the sampler's
    order; LoRA dropout 0, so the only differences are the all-reduce and summation order."""
    records = json.loads(open(os.path.join(ROOT, "dataset", "sample.json"), encoding="utf-8").read())[:8]
    data = tmp_path / "eight.json"
    data.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    common = [os.path.join(ROOT, "finetune.py"), "--base_model", tiny_llama_dir, "--data_path", str(data),
              "--max_steps", "5", "--save_steps", "100", "--cutoff_len", "128", "--lora_dropout", "0",
              "--learning_rate", "5e-3", "--warmup_ratio", "0", "--logging_steps", "1", "--report_to", "none"]
    single = subprocess.run([sys.executable, *common, "--output_dir", str(tmp_path / "one"),
                             "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={free_port()}", *common, "--output_dir", str(tmp_path / "two"),
                             "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1"],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert double.returncode == 0, (double.stdout + double.stderr)[-4000:]
    one = json.loads((tmp_path / "one" / "training_summary.json").read_text())["loss_history"]
    two = json.loads((tmp_path / "two" / "training_summary.json").read_text())["loss_history"]
    print("1 process :", [round(loss, 6) for _, loss in one])
    print("2 processes:", [round(loss, 6) for _, loss in two])
    assert [s for s, _ in one] == [s for s, _ in two] == [1, 2, 3, 4, 5]
    assert one[-1][1] < one[0][1] - 0.01  # the adapters do move, so a later match means equal updates
    assert [loss for _, loss in two] == pytest.approx([loss for _, loss in one], rel=1e-4)


def test_sigterm_to_one_process_stops_both_at_the_same_step_with_a_checkpoint(tiny_llama_dir, tmp_path, free_port):
    """SIGTERM reaches only rank 1 (as when a scheduler kills one task): the stop flag is combined over a CPU
    (gloo) group, so both ranks finish the same step, write one complete checkpoint and exit 128 + 15."""
    import signal
    import time

    psutil = pytest.importorskip("psutil")
    from utils.checkpoints import checkpoint_problem, step_checkpoints
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           os.path.join(ROOT, "finetune.py"), "--base_model", tiny_llama_dir, "--output_dir", str(out),
           "--max_steps", "400", "--per_device_train_batch_size", "2", "--save_steps", "1000", "--cutoff_len", "128",
           "--logging_steps", "1", "--report_to", "none"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        output, deadline = [], time.time() + 300
        for line in proc.stdout:  # the Trainer's {'loss': ...} lines, one per step, from rank 0
            output.append(line)
            if sum("{'loss'" in x for x in output) >= 2:
                break
            assert time.time() < deadline, "".join(output)
        assert sum("{'loss'" in x for x in output) >= 2, "".join(output)[-3000:]  # not ended early
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
        assert len(workers) == 1, (workers, "".join(output)[-3000:])
        workers[0].send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=300)
    finally:  # never leave the processes behind, whatever failed
        for child in psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []:
            child.kill()
        proc.kill()
    log = "".join(output) + rest
    assert log.count("SIGTERM received") == 1, log[-4000:]
    stopped = [line for line in log.splitlines() if "stopped at step" in line]
    assert len(stopped) == 1, log[-4000:]  # rank 0 says it, for both
    saved = step_checkpoints(str(out))
    assert len(saved) == 1 and checkpoint_problem(saved[0]) is None, (saved, log[-3000:])
    step = int(saved[0].rsplit("-", 1)[1])
    assert f"stopped at step {step};" in stopped[0] and step < 400
