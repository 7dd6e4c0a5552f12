"""What finetune.py adds around the HF Trainer: the adapter's self-description, the final save, the loss plot
and the run summary."""

import json
import os
import platform
import shutil

from transformers import TrainerCallback

from utils.modeling import write_meta
from utils.prompts import template_record

FINAL_DIR = "checkpoint-final"


def library_versions():
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def adapter_meta(args, template, model_path):
    """Everything merge/chat need to rebuild the training setup from the adapter folder alone."""
    return {
        "base_model": args.base_model,
        "base_model_path": os.path.abspath(model_path) if os.path.isdir(model_path) else model_path,
        "bits": args.bits,
        "prompt_template": template_record(template),
        "cutoff_len": args.cutoff_len,
        "train_on_inputs": args.train_on_inputs,
        "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                 "target_modules": args.lora_target_modules},
        "args": {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))},
        "versions": library_versions(),
    }


class MetaCallback(TrainerCallback):
    """Writes training_meta.json into every checkpoint-N, so each one is a self-describing adapter."""

    def __init__(self, meta):
        self.meta = meta

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                write_meta(folder, dict(self.meta, global_step=state.global_step))


def check_adapter(folder):
    """An adapter file with no tensors is the classic silent failure (pitfall 2): refuse to call it done."""
    from safetensors import safe_open
    path = os.path.join(folder, "adapter_model.safetensors")
    with safe_open(path, "pt") as f:
        if not list(f.keys()):
            raise RuntimeError(f"{path} holds no tensors: the adapter was not saved")


def finish_run(trainer, meta, wall_seconds):
    """Save the final adapter (+ tokenizer + meta) into checkpoint-final, then the plot and summary."""
    out = trainer.args.output_dir
    final_dir = os.path.join(out, FINAL_DIR)
    tmp = final_dir + ".tmp"
    trainer.save_model(tmp)  # rank 0 writes; the other ranks return at once
    if not trainer.is_world_process_zero():
        return final_dir
    write_meta(tmp, dict(meta, global_step=trainer.state.global_step))
    check_adapter(tmp)
    if os.path.isdir(final_dir):
        shutil.rmtree(final_dir)
    os.replace(tmp, final_dir)
    history = trainer.state.log_history
    save_loss_plot(history, os.path.join(out, "loss.png"))
    summary = run_summary(trainer, history, wall_seconds)
    with open(os.path.join(out, "training_summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return final_dir


def run_summary(trainer, history, wall_seconds):
    import torch
    train_losses = [h["loss"] for h in history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    end = next((h for h in reversed(history) if "train_runtime" in h), {})
    return {
        "global_step": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "first_loss": train_losses[0] if train_losses else None,
        "final_loss": train_losses[-1] if train_losses else None,
        "final_eval_loss": eval_losses[-1] if eval_losses else None,
        "train_runtime_s": end.get("train_runtime"),
        "train_samples_per_second": end.get("train_samples_per_second"),
        "wall_time_s": round(wall_seconds, 1),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if torch.cuda.is_available() else None,
    }


def save_loss_plot(history, path):
    """Training (and eval) loss and the learning rate against optimizer steps, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    lrs = [(h["step"], h["learning_rate"]) for h in history if "learning_rate" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), marker="o", ms=3, label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="s", ms=4, label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if lrs:
        ax2 = ax.twinx()
        ax2.plot(*zip(*lrs), color="gray", ls="--", lw=1, label="learning rate")
        ax2.set_ylabel("learning rate")
        ax2.legend(loc="upper center")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
