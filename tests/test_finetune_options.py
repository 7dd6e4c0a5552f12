"""finetune.py options on the tiny 4-bit LLaMA: held-out evaluation and the plot/summary it feeds."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_val_set_size_logs_eval_loss(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "finetune.py"), "--base_model", tiny_llama_dir,
                           "--output_dir", str(out), "--max_steps", "4", "--per_device_train_batch_size", "2",
                           "--gradient_accumulation_steps", "1", "--save_steps", "2", "--cutoff_len", "128",
                           "--val_set_size", "0.1"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 48 records: 5 held out, and 1 training record is dropped by --cutoff_len 128
    assert "42 training / 5 validation examples" in proc.stdout
    summary = json.loads((out / "training_summary.json").read_text())
    assert [step for step, _ in summary["eval_loss_history"]] == [2, 4]
    assert summary["final_eval_loss"] == summary["eval_loss_history"][-1][1] > 0
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
