"""What finetune.py adds around the HF Trainer: the adapter's self-description, the final save, the loss plot
and the run summary."""

import json
import math
import os
import platform
import shutil
import signal
import time

import torch
import transformers
from transformers import TrainerCallback

from utils.checkpoints import check_adapter, rotate_checkpoints
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


class Trainer(transformers.Trainer):
    """The HF Trainer, with perplexity next to every eval loss it logs (in the console, TensorBoard and the
    run summary alike), and under FSDP its adapter saved and loaded by utils/fsdp.py: the Trainer's own FSDP
    path writes an adapter with no tensors and cannot resume from an adapter checkpoint (utils/fsdp.py says why).
    The final save and every checkpoint-N go through save_model; resume and the best checkpoint through
    _load_from_checkpoint and _load_best_model."""

    def __init__(self, *args, count_tokens=None, saved_tensors=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.saved_tensors = saved_tensors  # a context for forward + loss (TrainingSpeedups.saved_tensors)
        # The Trainer's own token count (include_num_input_tokens_seen) reads it back from the GPU after every
        # micro-batch: a GPU->CPU wait per step, and under DDP a collective as well, which kept 2 GPUs from
        # scaling. Here the count stays on the device (or is the batch's shape) and is added up across
        # processes only where it is read: each log, each checkpoint, the end of the first step.
        self.count_tokens = count_tokens  # "all", "non_padding" or None
        self._uncounted = 0
        self._units_told = False
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, Throughput):
                callback.tokens_seen = self.tokens_seen

    def training_step(self, model, inputs, *args, **kwargs):
        if not self._units_told:  # once, the first step (the Trainer wraps the model in FSDP just before)
            self._units_told = True
            models = self._fsdp_models()
            if models is not None and self.is_world_process_zero():
                from utils import fsdp
                print(fsdp.describe_units(models[0]), flush=True)
        if self.count_tokens:
            mask = inputs.get("attention_mask") if self.count_tokens == "non_padding" else None
            self._uncounted = self._uncounted + (mask.sum() if mask is not None else inputs["input_ids"].numel())
        return super().training_step(model, inputs, *args, **kwargs)

    def compute_loss(self, model, inputs, *args, **kwargs):
        expect = getattr(self.compute_loss_func, "expect", None)
        if expect is not None:  # a loss computed during the forward pass (FusedCausalLMLoss(in_output_layer=True))
            num_items = kwargs.get("num_items_in_batch", args[1] if len(args) > 1 else None)
            expect(inputs.get("labels"), num_items)
        if self.saved_tensors is None:
            return super().compute_loss(model, inputs, *args, **kwargs)
        with self.saved_tensors():
            return super().compute_loss(model, inputs, *args, **kwargs)

    def tokens_seen(self):
        """state.num_input_tokens_seen brought up to date with the micro-batches of every process. Collective:
        called at the same points on every process (log, checkpoint, Throughput's first step)."""
        if self.count_tokens:
            pending, self._uncounted = self._uncounted, 0
            pending = torch.as_tensor(pending, dtype=torch.int64, device=self.args.device)
            self.state.num_input_tokens_seen += int(self.accelerator.gather(pending).sum())
        return self.state.num_input_tokens_seen

    def log(self, logs, *args, **kwargs):
        if "eval_loss" in logs:
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
        warning = non_finite_loss_warning(logs, self.state.global_step)
        if warning and not getattr(self, "_warned_non_finite", False) and self.is_world_process_zero():
            self._warned_non_finite = True
            print(warning, flush=True)
        if self.count_tokens:
            logs["num_input_tokens_seen"] = self.tokens_seen()
        super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, *args, **kwargs):
        self.tokens_seen()  # trainer_state.json holds the count, for a resume to continue from
        return super()._save_checkpoint(*args, **kwargs)

    def _fsdp_models(self):
        """(FSDP root, the PeftModel inside it) once the Trainer has wrapped the model in FSDP, else None."""
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        if self.is_fsdp_enabled and isinstance(self.model_wrapped, FSDP):
            return self.model_wrapped, self.accelerator.unwrap_model(self.model_wrapped)
        return None

    def save_model(self, output_dir=None, _internal_call=False):
        models = self._fsdp_models()
        if models is None:
            return super().save_model(output_dir, _internal_call)
        from utils import fsdp
        output_dir = output_dir or self.args.output_dir
        count = fsdp.save_adapter(*models, output_dir, is_main=self.args.should_save)  # every process gathers
        if self.args.should_save:  # the rest of what Trainer._save writes next to the adapter
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
            print(f"FSDP: adapter gathered from {self.args.world_size} processes ({count} tensors) into "
                  f"{output_dir}", flush=True)

    def _save_optimizer_and_scheduler(self, output_dir):
        if self._fsdp_models() is None:
            return super()._save_optimizer_and_scheduler(output_dir)
        # the Trainer would also write pytorch_model_fsdp.bin: the whole model gathered once more and put through
        # the same peft filter, so empty too, and its resume would load that emptiness without a word; the
        # adapter is in adapter_model.safetensors already
        from accelerate.utils import save_fsdp_optimizer
        save_fsdp_optimizer(self.accelerator.state.fsdp_plugin, self.accelerator, self.optimizer, self.model,
                            output_dir)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        models = self._fsdp_models()
        if models is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from utils import fsdp
        count = fsdp.load_adapter(*models, resume_from_checkpoint)
        if self.args.should_save:
            print(f"FSDP: adapter loaded from {resume_from_checkpoint} ({count} tensors)", flush=True)

    def _load_best_model(self):
        if self._fsdp_models() is None:
            return super()._load_best_model()
        self._load_from_checkpoint(self.state.best_model_checkpoint)


def non_finite_loss_warning(logs, step):
    """One line when a logged loss is NaN or infinite, else None. The Trainer's own filter would have replaced it
    by the running mean and hidden it (pitfall 4); here it is logged as it is, and said once."""
    for key in ("loss", "eval_loss"):
        value = logs.get(key)
        if isinstance(value, (int, float)) and not math.isfinite(value):
            return (f"warning: {key} is {value} at step {step}: training has diverged (fp16 overflow, too high a "
                    "learning rate, or bad data); the adapter saved from here on is damaged")
    return None


def report_targets(report_to, log=print):
    """--report_to as the Trainer takes it; auto = TensorBoard when its package is installed."""
    if report_to != "auto":
        return [t.strip() for t in report_to.split(",") if t.strip()] or "none"
    import importlib.util
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        return ["tensorboard"]
    log("note: TensorBoard is not installed (pip install tensorboard), so only loss.png and the console log "
        "record the run")
    return "none"


def one_gpu_per_process(training_args):
    """Plain `python finetune.py` on a machine with several GPUs: the model sits on GPU 0 (a 4-bit model cannot
    be replicated by nn.DataParallel, so the Trainer does not wrap it), yet the Trainer would still multiply the
    micro-batch by the GPU count, silently doubling the batch and the logged loss on 2 GPUs (seen on 2 H100s).
    Keep it to one GPU, as the printed effective batch says; torchrun / accelerate use them all."""
    if training_args.world_size == 1 and training_args.n_gpu > 1:
        training_args._n_gpu = 1  # the Trainer reads the visible-GPU count from this field only
    return training_args


def distributed():
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def max_over_processes(value, group=None):
    """The largest integer `value` over the processes of a torchrun / accelerate run (`value` itself when there
    is one process). Collective: every process must call it. `group`: a CPU (gloo) group, see cpu_group."""
    import torch.distributed as dist
    if not distributed():
        return value
    on_gpu = group is None and "nccl" in str(dist.get_backend())
    flag = torch.tensor([value], dtype=torch.int64, device=f"cuda:{torch.cuda.current_device()}" if on_gpu else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return int(flag.item())


def cpu_group():
    """A process group over the CPU (gloo) for small flags: exchanging them through NCCL would make each process
    wait for its GPU to finish all queued work first. None when not distributed. Collective."""
    import torch.distributed as dist
    return dist.new_group(backend="gloo") if distributed() else None


class GracefulStop(TrainerCallback):
    """SIGTERM or Ctrl-C: finish the current optimizer step, save a normal resumable checkpoint, stop.

    The checkpoint is the same one a periodic save at that step writes (adapter, optimizer, scheduler, RNG,
    data position), so resuming from it continues exactly. Under several processes the flag is combined
    across ranks so that all of them stop at the same step."""

    def __init__(self):
        self.signum, self._previous, self.group = None, {}, None

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: give up waiting for the step to end
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step "
              "(send it again to abort without saving)", flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        if self.group is None:
            self.group = cpu_group()

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def on_step_end(self, args, state, control, **kwargs):
        if max_over_processes(int(self.signum is not None), self.group):  # on the CPU: no wait for the GPU
            self.signum = self.signum or signal.SIGTERM
            control.should_save = True
            control.should_training_stop = True
        return control


class Throughput(TrainerCallback):
    """Tokens per second after the first optimizer step, so start-up costs (CUDA context, kernel selection,
    data loader workers) do not count, and over the second half of the steps (compilation and allocator
    warm-up, which can last a few steps, left out: the steady rate); `run_summary` reports them next to the
    whole-run figure. Also the GPU peak from the first step on (setup, e.g. FSDP wrapping, excluded), beside
    the whole run's peak."""

    def __init__(self):
        self.start = self.half = self.tokens_per_second = self.tokens_per_second_second_half = None
        self.setup_peak_bytes = None
        self.tokens_seen = None  # set by our Trainer: brings state.num_input_tokens_seen up to date

    def _mark(self, state):
        # the count first: bringing it up to date waits for the GPU, which may be steps behind the CPU here
        tokens = self.tokens_seen() if self.tokens_seen else state.num_input_tokens_seen
        return time.perf_counter(), tokens

    def on_train_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            self.setup_peak_bytes = torch.cuda.max_memory_allocated()  # loading and wrapping the model
            torch.cuda.reset_peak_memory_stats()

    def on_step_end(self, args, state, control, **kwargs):
        if self.start is None:
            self.start = self._mark(state)
        if self.half is None and state.max_steps >= 4 and state.global_step == state.max_steps // 2:
            self.half = self._mark(state)

    @staticmethod
    def _rate(mark, state):
        seconds = time.perf_counter() - mark[0]
        tokens = state.num_input_tokens_seen - mark[1]
        return round(tokens / seconds, 1) if tokens and seconds > 0 else None

    def on_train_end(self, args, state, control, **kwargs):
        if self.start is not None:
            self.tokens_per_second = self._rate(self.start, state)
        if self.half is not None:
            self.tokens_per_second_second_half = self._rate(self.half, state)

    def gpu_peaks(self):
        """(whole run, training steps only) peak bytes allocated on this process's GPU so far."""
        steps = torch.cuda.max_memory_allocated()
        if self.setup_peak_bytes is None:
            return steps, steps
        return max(self.setup_peak_bytes, steps), steps


class MetaCallback(TrainerCallback):
    """Writes training_meta.json into every checkpoint-N, so each one is a self-describing adapter, then
    removes old checkpoints beyond `keep`.

    The rotation is done here, not by the Trainer's save_total_limit: the Trainer deletes old checkpoints
    before this callback has marked the new one complete, so a kill in between could leave no complete
    checkpoint at all. Here a checkpoint is only deleted once a newer complete one exists."""

    def __init__(self, meta, keep=None):
        self.meta, self.keep = meta, keep

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                write_meta(folder, dict(self.meta, global_step=state.global_step))
                rotate_checkpoints(args.output_dir, self.keep, protect=state.best_model_checkpoint)


def finish_run(trainer, meta, wall_seconds, gpu_peaks=None):
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
    summary = run_summary(trainer, history, wall_seconds, gpu_peaks)
    with open(os.path.join(out, "training_summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return final_dir


def run_summary(trainer, history, wall_seconds, gpu_peaks=None):
    train_losses = [h["loss"] for h in history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    end = next((h for h in reversed(history) if "train_runtime" in h), {})
    tokens = trainer.state.num_input_tokens_seen  # non-padding tokens, summed over all processes
    throughput = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, Throughput)), None)
    peak_gpu_bytes, peak_steps_bytes = gpu_peaks or (None, None)  # (whole run, training steps) in bytes

    def gib(n):
        return round(n / 2**30, 2) if n is not None else None

    runtime = end.get("train_runtime")
    return {
        "global_step": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "first_loss": train_losses[0] if train_losses else None,
        "final_loss": train_losses[-1] if train_losses else None,
        "final_eval_loss": eval_losses[-1] if eval_losses else None,
        "final_eval_perplexity": math.exp(min(eval_losses[-1], 50.0)) if eval_losses else None,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "tokens_seen": tokens,
        "tokens_per_second": round(tokens / runtime, 1) if tokens and runtime else None,
        "tokens_per_second_after_first_step": throughput and throughput.tokens_per_second,
        "tokens_per_second_second_half": throughput and throughput.tokens_per_second_second_half,
        "train_runtime_s": runtime,
        "train_samples_per_second": end.get("train_samples_per_second"),
        "wall_time_s": round(wall_seconds, 1),
        "peak_gpu_memory_gib": gib(peak_gpu_bytes),
        "peak_gpu_memory_steps_gib": gib(peak_steps_bytes),  # from the first step on (no loading / wrapping)
        "peak_process_memory_gib": round(_peak_rss_bytes() / 2**30, 2),
        "loss_history": [[h["step"], h["loss"]] for h in history if "loss" in h],
        "eval_loss_history": [[h["step"], h["eval_loss"]] for h in history if "eval_loss" in h],
    }


def _peak_rss_bytes():
    import resource
    import sys
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


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
