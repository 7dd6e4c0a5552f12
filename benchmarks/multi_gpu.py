"""Multi-GPU evidence on one host with 2+ GPUs: DDP scaling, FSDP-QLoRA memory, --num_gpus inference.

    python benchmarks/multi_gpu.py --out /tmp/mgpu                   # LLaMA-2-7B shape, random weights
    python benchmarks/multi_gpu.py --out /tmp/mgpu --shape tiny --infer_layers 2 --steps 3 --seq 128  # smoke

Every run goes through the scripts exactly as users launch them (finetune.py under python, torchrun and
accelerate launch; cli_demo.py), with the same global batch, so the loss curves are comparable:
  1. one GPU            python finetune.py       micro-batch M, accumulation 1 (and --no-speedups: single_plain)
  2. DDP, 2 GPUs        torchrun                 micro-batch M per GPU
  3. FSDP-QLoRA, 2 GPUs accelerate launch --config_file configs/accelerate_fsdp_qlora.yaml, micro-batch M
     (and, with --only ...,zero3, DeepSpeed ZeRO-3 through configs/accelerate_deepspeed_zero3.yaml)
  4. inference: cli_demo.py greedy on 1 GPU vs --num_gpus 2, in 16-bit and 4-bit, on a model of the same width
Throughput is real (non-pad) tokens per second of training over the second half of the steps (the steady rate;
the rate after the first step is reported too); peak memory is torch.cuda.max_memory_allocated of each process
(the largest over ranks), over the whole run and over the training steps alone.
results.json holds each run's summary and, under "comparison", the issue's targets: DDP tokens/s after the
first step / single's (>= 1.8), FSDP peak / single peak (<= 0.6), and the loss gaps between runs.
"""

import argparse
import copy
import glob
import json
import os
import random
import shutil
import subprocess
import sys
import time

import common  # first: it puts the project root on sys.path

ROOT = common.ROOT


def write_data(path, records, vocab, words=560, seed=0):
    """Alpaca records long enough that every example fills --cutoff_len: no padding in any batch."""
    rng = random.Random(seed)
    def text(n):  # words of common.word_tokenizer: w3 ... w{vocab-1}, one token each
        return " ".join(f"w{rng.randrange(3, vocab)}" for _ in range(n))
    data = [{"instruction": text(24), "input": "", "output": text(words)} for _ in range(records)]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
    return path


def run(name, cmd, log_dir, env=None, timeout=900):
    started = time.time()
    with open(os.path.join(log_dir, f"{name}.log"), "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                              env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
    took = time.time() - started
    print(f"[{name}] exit {proc.returncode} in {took:.0f} s", flush=True)
    if proc.returncode:
        print(open(os.path.join(log_dir, f"{name}.log")).read()[-3000:], flush=True)
    return proc.returncode == 0


def summary(out_dir, log_path):
    with open(os.path.join(out_dir, "training_summary.json")) as f:
        s = json.load(f)
    with open(log_path) as f:  # the batch finetune.py printed (and, since one_gpu_per_process, trained)
        batch = next((line.split(": ", 1)[1].strip() for line in f if line.startswith("effective batch size:")), None)
    return {"effective_batch": batch, **{k: s[k] for k in (
        "tokens_seen", "tokens_per_second", "tokens_per_second_after_first_step", "tokens_per_second_second_half",
        "peak_gpu_memory_gib", "peak_gpu_memory_steps_gib",
        "train_runtime_s", "loss_history")}}


# The targets, checked on whichever runs finished. "single" and "ddp" are a like-for-like pair per GPU:
# the same micro-batch per forward pass (plain python keeps to one GPU, utils/training.py: one_gpu_per_process),
# one optimizer step per micro-batch, the same steps and code path (both use the fused speed-ups); DDP's global
# batch is twice as large. (An earlier pairing, 1 x M x 2 against 2 x M x 1, gave the single GPU half the
# optimizer steps and Trainer bookkeeping per token, which flattered it: 1.61x on 2 H100s.) The loss-curve
# equality of one and two processes at the same global batch is tests/test_distributed.py's job. FSDP runs
# peft's layers (no fused layers; packing, the chunked loss and parked inputs do apply) and ZeRO-3 the plain
# path, so their peaks are compared with both single runs; the fused single run is the one the target means.
TARGETS = {"ddp_speedup": (">=", 1.8), "fsdp_peak_over_single_peak": ("<=", 0.6),
           "fsdp_peak_over_single_plain_peak": ("<=", 0.6),
           "max_loss_diff_ddp_fsdp": ("<=", 0.01)}  # "the same loss curve as DDP": bf16 noise at loss ~11


def comparison(results):
    """Ratios and loss gaps between the runs present in `results`, each with its target and whether it is met."""
    out = {}
    single, ddp, fsdp = (results.get(name) for name in ("single", "ddp", "fsdp"))
    # the steady rate (second half of the steps): the first steps compile the fused layers, and how long that
    # takes varied by 10% between otherwise equal runs, so it does not belong in a scaling figure
    key = "tokens_per_second_second_half"
    if single and ddp and single.get(key) and ddp.get(key):
        out["ddp_speedup"] = round(ddp[key] / single[key], 3)
    first = "tokens_per_second_after_first_step"
    if single and ddp and single[first] and ddp[first]:
        out["ddp_speedup_after_first_step"] = round(ddp[first] / single[first], 3)
        out["ddp_tokens_over_single_tokens"] = round(ddp["tokens_seen"] / max(1, single["tokens_seen"]), 3)
    if single and fsdp and single["peak_gpu_memory_gib"] and fsdp["peak_gpu_memory_gib"] is not None:
        out["fsdp_peak_over_single_peak"] = round(fsdp["peak_gpu_memory_gib"] / single["peak_gpu_memory_gib"], 3)
    plain = results.get("single_plain")
    if plain and fsdp and plain["peak_gpu_memory_gib"] and fsdp["peak_gpu_memory_gib"] is not None:
        out["fsdp_peak_over_single_plain_peak"] = round(fsdp["peak_gpu_memory_gib"] / plain["peak_gpu_memory_gib"],
                                                        3)
    for a, b in (("ddp", "fsdp"), ("ddp", "zero3")):
        if a in results and b in results:
            la = [loss for _, loss in results[a]["loss_history"]]
            lb = [loss for _, loss in results[b]["loss_history"]]
            out[f"max_loss_diff_{a}_{b}"] = max(abs(x - y) for x, y in zip(la, lb))
    for name, (op, bound) in TARGETS.items():
        if name in out:
            out[f"{name}_target"] = f"{op} {bound}"
            out[f"{name}_met"] = out[name] >= bound if op == ">=" else out[name] <= bound
    return out


def save(results, log_dir):
    with open(os.path.join(log_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="work folder (model, data, outputs)")
    p.add_argument("--log_dir", default=None, help="logs and results.json, written after each run (default: --out)")
    common.add_shape_args(p)
    p.add_argument("--infer_layers", type=int, default=8, help="layers of the inference check's model")
    p.add_argument("--micro_batch", type=int, default=4, help="examples per GPU per forward pass")
    p.add_argument("--seq", type=int, default=512, help="tokens per example (--cutoff_len)")
    p.add_argument("--steps", type=int, default=32, help="optimizer steps per training run (the first few compile "
                   "the fused layers; the DDP ratio uses the second half)")
    p.add_argument("--profile_steps", default=None, metavar="A-B", help="also profile these optimizer steps of "
                   "every training run (finetune.py --profile_steps); the tables go into <log_dir>/profiles.txt")
    p.add_argument("--logging_steps", type=int, default=4, help="the Trainer's logging interval: each log reads "
                   "the loss back from the GPU, a wait per logged step (finetune.py's default is up to 10)")
    p.add_argument("--only", default="single,ddp,fsdp,infer", help="comma-separated subset of the runs")
    args = p.parse_args()
    only = set(args.only.split(","))
    os.makedirs(args.out, exist_ok=True)
    log_dir = args.log_dir or args.out
    os.makedirs(log_dir, exist_ok=True)
    if args.profile_steps:
        open(os.path.join(log_dir, "profiles.txt"), "w").close()  # this run's tables only (appended per run)
    import torch
    gpus = torch.cuda.device_count()
    print(f"{gpus} GPU(s): {[torch.cuda.get_device_name(i) for i in range(gpus)]}; torch {torch.__version__}",
          flush=True)
    t = time.time()
    config = common.llama_config(args)
    model = common.build_checkpoint(os.path.join(args.out, "model"), config)
    print(f"model ready in {time.time() - t:.0f} s", flush=True)
    records = args.micro_batch * 2 * args.steps
    data = write_data(os.path.join(args.out, "data.json"), records, vocab=config.vocab_size)
    train = [os.path.join(ROOT, "finetune.py"), "--base_model", model, "--data_path", data, "--max_steps",
             str(args.steps), "--cutoff_len", str(args.seq), "--per_device_train_batch_size", str(args.micro_batch),
             "--save_steps", "100000", "--logging_steps", str(args.logging_steps), "--report_to", "none",
             "--optim", "adamw_torch",
             "--learning_rate", "1e-4", "--warmup_ratio", "0", "--lora_dropout", "0", "--prompt_template", "alpaca"]
    launchers = {  # run name -> (command before finetune.py, gradient accumulation, extra flags)
        "single": ([sys.executable], 1),  # one optimizer step per micro-batch, as each DDP process does
        "single_plain": ([sys.executable], 1, ["--no-speedups"]),  # the plain peft path, as ZeRO-3 runs it
        "ddp": ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"], 1),
        "fsdp": ([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  os.path.join(ROOT, "configs", "accelerate_fsdp_qlora.yaml")], 1),
        "zero3": ([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   os.path.join(ROOT, "configs", "accelerate_deepspeed_zero3.yaml")], 1),
    }
    results = {}

    def train_run(name):
        launcher, accumulation, *extra = launchers[name]
        extra = extra[0] if extra else []
        if name == "fsdp":  # a periodic checkpoint too, for the resume run
            extra = ["--save_steps", str(max(1, args.steps // 2))]
        if args.profile_steps:
            extra = [*extra, "--profile_steps", args.profile_steps]
        if name in only:  # a fresh folder: finetune.py refuses to start over in one with checkpoints
            shutil.rmtree(os.path.join(args.out, name), ignore_errors=True)
        if name in only and (name.startswith("single") or gpus >= 2) and run(name, [
                *launcher, *train, "--output_dir", os.path.join(args.out, name),
                "--gradient_accumulation_steps", str(accumulation), *extra], log_dir):
            results[name] = summary(os.path.join(args.out, name), os.path.join(log_dir, f"{name}.log"))
            results["comparison"] = comparison(results)
            tables = sorted(glob.glob(os.path.join(args.out, name, "profile", "rank*.txt")))
            with open(os.path.join(log_dir, "profiles.txt"), "a") as f:  # one file: few files come back
                for path in tables:
                    f.write(f"===== {name} {os.path.basename(path)} =====\n{open(path).read()}\n")
        save(results, log_dir)

    for name in ("single", "single_plain", "ddp", "fsdp"):
        train_run(name)
    if "fsdp_resume" in only and "fsdp" in results:  # resume FSDP from its periodic checkpoint to the end
        folder = os.path.join(args.out, "fsdp")
        half = max(1, args.steps // 2)
        launcher, accumulation = launchers["fsdp"]
        ok = run("fsdp_resume", [*launcher, *train, "--output_dir", folder, "--gradient_accumulation_steps",
                                 str(accumulation), "--save_steps", str(half), "--resume_from_checkpoint",
                                 os.path.join(folder, f"checkpoint-{half}")], log_dir)
        resumed = summary(folder, os.path.join(log_dir, "fsdp_resume.log")) if ok else None
        first = dict(results["fsdp"]["loss_history"])
        results["fsdp_resume"] = {"exit_ok": ok, "loss_history": resumed and resumed["loss_history"],
                                  "max_loss_diff_vs_uninterrupted": resumed and max(
                                      abs(loss - first[step]) for step, loss in resumed["loss_history"])}
        save(results, log_dir)

    if "infer" in only and gpus >= 2:
        small_config = copy.deepcopy(config)
        small_config.num_hidden_layers = args.infer_layers
        small = common.build_checkpoint(os.path.join(args.out, "infer_model"), small_config)
        prompt = " ".join(f"w{i * 7 + 11}" for i in range(40)) + "\n"
        for bits in (16, 4):
            for n in (1, 2):
                name = f"infer_{bits}bit_{n}gpu"
                cmd = [sys.executable, os.path.join(ROOT, "cli_demo.py"), "--model_path", small, "--bits", str(bits),
                       "--num_gpus", str(n), "--temperature", "0", "--max_new_tokens", "48",
                       "--input_pattern", "alpaca"]
                with open(os.path.join(log_dir, f"{name}.log"), "w") as log:
                    proc = subprocess.run(cmd, cwd=ROOT, input=prompt, text=True, stdout=subprocess.PIPE,
                                          stderr=log, timeout=600)
                replies = [line for line in proc.stdout.splitlines() if line.startswith("Assistant:")]
                results[name] = {"exit": proc.returncode, "reply": replies[0] if replies else None}
                print(f"[{name}] exit {proc.returncode}: {str(results[name]['reply'])[:100]}", flush=True)
                save(results, log_dir)

    train_run("zero3")  # last: the optional DeepSpeed run

    print("\n| run | processes x micro-batch x accumulation | tokens/s | peak GiB / GPU | losses (first, last) |")
    print("|---|---|---|---|---|")
    shape = {"single": "1 x {m} x 1", "ddp": "2 x {m} x 1", "fsdp": "2 x {m} x 1", "zero3": "2 x {m} x 1"}
    shape["single_plain"] = shape["single"]
    for name in ("single", "single_plain", "ddp", "fsdp", "zero3"):
        if name in results:
            s = results[name]
            losses = [loss for _, loss in s["loss_history"]]
            print(f"| {name} | {shape[name].format(m=args.micro_batch)} | {s['tokens_per_second_second_half']} | "
                  f"{s['peak_gpu_memory_gib']} | {losses[0]:.4f}, {losses[-1]:.4f} |")
    for name, value in results.get("comparison", {}).items():
        print(f"{name}: {value}")
    for bits in (16, 4):
        one, two = results.get(f"infer_{bits}bit_1gpu"), results.get(f"infer_{bits}bit_2gpu")
        if one and two:
            print(f"{bits}-bit greedy reply, 1 GPU vs --num_gpus 2: "
                  f"{'identical' if one['reply'] == two['reply'] and one['reply'] else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
