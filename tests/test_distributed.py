"""`torchrun --nproc_per_node=2 finetune.py` unchanged, on the CPU (gloo), 4-bit tiny LLaMA: it finishes,
prints the effective batch once, and only rank 0 writes one set of checkpoints."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_torchrun_two_processes(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
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
