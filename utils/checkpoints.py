"""checkpoint-N folders: which are complete (resumable exactly), the newest complete one, and rotation.

Plain file-system code with no torch import, so finetune.py checks --resume_from_checkpoint and --output_dir
before loading anything heavy."""

import json
import os
import re
import shutil

META_FILE = "training_meta.json"  # how an adapter / merged model was made; read by merge, CLI and web UI


def rotate_checkpoints(output_dir, keep, protect=None, log=print):
    """Keep the newest `keep` complete checkpoint-N (and `protect`, the best one); delete older complete ones
    and torn ones older than the newest complete one. None or 0 keeps everything. Ordered by step, not by
    file time. Returns the deleted folders."""
    if not keep:
        return []
    complete_seen, deleted = 0, []
    for folder in step_checkpoints(output_dir):  # newest first
        complete = checkpoint_problem(folder) is None
        if protect and os.path.abspath(folder) == os.path.abspath(protect):
            complete_seen += complete
            continue
        if complete_seen >= keep or (complete_seen and not complete):
            shutil.rmtree(folder, ignore_errors=True)
            deleted.append(folder)
        else:
            complete_seen += complete
    if deleted:
        log(f"removed old checkpoints: {', '.join(os.path.basename(d) for d in deleted)}")
    return deleted


# A checkpoint can resume exactly only with all of these. training_meta.json is written by MetaCallback after
# the Trainer has finished writing the rest, so it doubles as the "complete" mark: a checkpoint killed while
# being written lacks it and is never resumed from.
RESUME_FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", META_FILE)
# where FSDP saves the optimizer instead of optimizer.pt (full or sharded state dict)
OPTIMIZER_ALTERNATIVES = ("optimizer.bin", "optimizer_0")


def checkpoint_problem(folder):
    """None if `folder` is a complete, resumable checkpoint; else what is wrong with it."""
    def present(name):
        alternatives = OPTIMIZER_ALTERNATIVES if name == "optimizer.pt" else ()
        return any(os.path.exists(os.path.join(folder, n)) for n in (name, *alternatives))
    missing = [f for f in RESUME_FILES if not present(f)]
    if missing:
        return "missing " + ", ".join(missing)
    try:
        with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as f:
            json.load(f)
        check_adapter(folder)
    except (OSError, ValueError, RuntimeError) as e:
        return f"unreadable ({e})"
    return None


def step_checkpoints(output_dir):
    """checkpoint-N folders in `output_dir`, newest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m[1]), d) for d in os.listdir(output_dir) if (m := re.fullmatch(r"checkpoint-(\d+)", d))]
    return [os.path.join(output_dir, d) for _, d in sorted(found, reverse=True)]


def latest_complete_checkpoint(output_dir, log=print):
    """The newest checkpoint-N that can resume exactly; incomplete newer ones are reported and skipped."""
    for folder in step_checkpoints(output_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        log(f"warning: skipping incomplete checkpoint {folder}: {problem}")
    return None


def check_adapter(folder):
    """An adapter file with no tensors is the classic silent failure (pitfall 2): refuse to call it done."""
    from safetensors import safe_open
    path = os.path.join(folder, "adapter_model.safetensors")
    with safe_open(path, "pt") as f:
        if not list(f.keys()):
            raise RuntimeError(f"{path} holds no tensors: the adapter was not saved")
