"""finetune.py options on the tiny 4-bit LLaMA: held-out evaluation, perplexity, early stopping, TensorBoard
logs and the plot/summary they feed."""

import glob
import json
import math
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def finetune(model_dir, out, *extra):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "finetune.py"), "--base_model", model_dir,
                           "--output_dir", str(out), "--per_device_train_batch_size", "2",
                           "--gradient_accumulation_steps", "1", "--cutoff_len", "128", *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads((out / "training_summary.json").read_text())


def test_val_set_size_logs_eval_loss_perplexity_and_tensorboard(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    log, summary = finetune(tiny_llama_dir, out, "--max_steps", "4", "--save_steps", "2", "--val_set_size", "0.1")
    # 48 records: 5 held out, and 1 training record is dropped by --cutoff_len 128
    assert "42 training / 5 validation examples" in log
    assert [step for step, _ in summary["eval_loss_history"]] == [2, 4]  # no duplicate final evaluation
    assert summary["final_eval_loss"] == summary["eval_loss_history"][-1][1] > 0
    assert summary["final_eval_perplexity"] == math.exp(summary["final_eval_loss"])
    assert f"perplexity {summary['final_eval_perplexity']:.3f}" in log
    # 4 steps x 2 examples of real (unpadded) tokens, counted by the Trainer; cutoff 128 bounds them
    assert 8 * 10 < summary["tokens_seen"] <= 8 * 128 and summary["tokens_per_second"] > 0
    assert summary["tokens_per_second_after_first_step"] > 0 and summary["tokens_per_second_second_half"] > 0
    assert summary["peak_process_memory_gib"] > 0.1
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    events = glob.glob(str(out / "runs" / "*" / "events.out.tfevents.*"))  # TensorBoard is on by default
    assert events, os.listdir(out)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.dirname(events[0]))
    acc.Reload()
    assert {"train/loss", "eval/loss", "eval/perplexity"} <= set(acc.Tags()["scalars"])


def test_early_stopping_keeps_the_best_checkpoint(tiny_llama_dir, tmp_path):
    """The held-out answers use a word the training answers never do, so the more the model learns the training
    answers the worse it predicts the held-out ones: the eval loss rises, training stops `patience` evaluations
    after the best one, and checkpoint-final must be the best checkpoint's adapter, not the last step's."""
    from utils.data import split_train_val
    held_out = set(split_train_val(list(range(40)), 8, 42)[1])  # the records finetune.py holds out (seed 42)
    records = [{"instruction": f"Item {i}: say the code word.", "input": "",
                "output": "omega omega omega" if i in held_out else "alpha alpha alpha"} for i in range(40)]
    data = tmp_path / "words.json"
    data.write_text(json.dumps(records), encoding="utf-8")
    out = tmp_path / "out"
    log, summary = finetune(tiny_llama_dir, out, "--data_path", str(data), "--max_steps", "60", "--save_steps", "2",
                            "--val_set_size", "8", "--early_stopping_patience", "2", "--learning_rate", "5e-3",
                            "--warmup_ratio", "0", "--lr_scheduler_type", "constant", "--report_to", "none",
                            "--save_total_limit", "1", "--logging_steps", "1")
    evals = summary["eval_loss_history"]
    best_step, best = min(evals, key=lambda e: e[1])
    print("eval losses:", [(step, round(loss, 4)) for step, loss in evals])
    assert summary["global_step"] < 60 and summary["global_step"] == evals[-1][0] == best_step + 2 * 2, evals
    assert evals[-1][1] > best and summary["final_loss"] < summary["first_loss"]  # held-out up, training down
    assert summary["best_checkpoint"].endswith(f"checkpoint-{best_step}")
    assert os.path.isdir(summary["best_checkpoint"])  # rotation never removes the best one
    assert f"best eval loss {best:.4f}" in log
    # checkpoint-final holds the best checkpoint's adapter, not the last step's
    from safetensors.torch import load_file
    final = load_file(str(out / "checkpoint-final" / "adapter_model.safetensors"))
    kept = load_file(os.path.join(summary["best_checkpoint"], "adapter_model.safetensors"))
    last = load_file(str(out / f"checkpoint-{summary['global_step']}" / "adapter_model.safetensors"))
    assert final.keys() == kept.keys() and all((final[k] == kept[k]).all() for k in final)
    assert any((final[k] != last[k]).any() for k in final)
    assert not (out / "runs").exists()  # --report_to none


def test_tokens_seen_counts_every_real_token(tiny_llama_dir, tmp_path):
    """Every example is cut to --cutoff_len 128, so 3 steps x 2 x 2 examples are exactly 1,536 real tokens, on
    the packed path (no padding, no attention mask) and the padded one alike. The text holds the pad token
    itself ("<|endoftext|>", id 0 for this tokenizer, as "<unk>" is for tokenizers padded with it): real tokens
    equal to the pad id must count too."""
    records = [{"instruction": f"Repeat {i}.", "output": " ".join(["<|endoftext|> word"] * 200)}
               for i in range(12)]
    data = tmp_path / "long.json"
    data.write_text(json.dumps(records), encoding="utf-8")
    for flag in ("--speedups", "--no-speedups"):
        out = tmp_path / flag.strip("-")
        _, summary = finetune(tiny_llama_dir, out, "--data_path", str(data), "--max_steps", "3",
                              "--gradient_accumulation_steps", "2", "--save_steps", "100", "--report_to", "none",
                              flag)
        assert summary["tokens_seen"] == 3 * 2 * 2 * 128, (flag, summary["tokens_seen"])


def test_a_nan_loss_is_logged_as_nan_and_said_once(tiny_llama_dir, tmp_path):
    """The HF Trainer would replace a NaN loss by the running mean (logging_nan_inf_filter) and hide a diverged
    run; finetune.py logs it as it is and prints one warning."""
    import shutil

    from safetensors.torch import load_file, save_file
    broken = tmp_path / "nan-model"
    shutil.copytree(tiny_llama_dir, broken)
    weights = load_file(str(broken / "model.safetensors"))
    weights["model.norm.weight"][0] = float("nan")  # every hidden state, so every loss, becomes NaN
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    log, summary = finetune(str(broken), tmp_path / "out", "--max_steps", "3", "--logging_steps", "1",
                            "--report_to", "none")
    assert log.count("warning: loss is nan at step 1: training has diverged") == 1, log[-2000:]
    assert "warning: loss is nan at step 2" not in log  # once
    assert [math.isnan(loss) for _, loss in summary["loss_history"]] == [True, True, True]


def test_profile_steps_writes_a_trace_and_a_table(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    log, summary = finetune(tiny_llama_dir, out, "--max_steps", "4", "--profile_steps", "2-3", "--report_to", "none")
    assert f"profiling optimizer steps 2-3 into {out / 'profile'}" in log
    table = (out / "profile" / "rank0.txt").read_text()
    assert table.startswith("optimizer steps 2-3, process 0") and "aten::" in table
    events = json.loads((out / "profile" / "rank0.json").read_text())["traceEvents"]
    steps = sorted({e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")})
    assert steps == ["ProfilerStep#1", "ProfilerStep#2"], steps  # the profiler's own count: steps 2 and 3
    assert summary["global_step"] == 4


def test_keep_dequantized_trains_the_same_adapter(tiny_llama_dir, tmp_path):
    """--keep_dequantized on (without checkpointing) reuses the forward pass's dequantized weights in the backward
    pass: the same arithmetic, so on the CPU the same adapter, bit for bit, as --keep_dequantized off."""
    from safetensors.torch import load_file
    adapters = {}
    for mode in ("on", "off"):
        out = tmp_path / mode
        log, _ = finetune(tiny_llama_dir, out, "--max_steps", "2", "--report_to", "none", "--no-gradient_checkpointing",
                          "--keep_dequantized", mode)
        said = "dequantized weights kept for the backward pass" if mode == "on" else "weights dequantized again"
        assert said in log, log[-2000:]
        adapters[mode] = load_file(str(out / "checkpoint-final" / "adapter_model.safetensors"))
    assert adapters["on"].keys() == adapters["off"].keys() and adapters["on"]
    assert all(torch.equal(adapters["on"][k], adapters["off"][k]) for k in adapters["on"])
