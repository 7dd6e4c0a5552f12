"""Training throughput on a random LLaMA: the plain transformers + peft + bitsandbytes recipe, this project's
training path (utils/speed.py, as finetune.py runs it) and unsloth, side by side on one card.

    python benchmarks/bench_train.py                                  # LLaMA-2-7B shape, 8 x 512, on the GPU
    python benchmarks/bench_train.py --stacks plain,ours --ckpt on    # a subset
    python benchmarks/bench_train.py --shape tiny --steps 2 --warmup 1 --batch 2 --seq 64   # CPU smoke run

Each stack runs in its own process (unsloth patches transformers when imported; peak memory is per process):
  plain    from_pretrained(NF4 + double quant, bf16 compute) -> prepare_model_for_kbit_training -> LoRA
           (dropout 0.05, the QLoRA recipe, and 0), model(**batch, labels) under bf16 autocast; padded batches
  ours     utils.modeling.load_model -> utils.speed (prepare_model, fused LoRA config, fused kernels, chunked
           loss, packed batches), the same pieces finetune.py uses
  unsloth  FastLanguageModel (dropout 0, offloaded checkpointing "unsloth"), run when it can be imported
           (--unsloth_site: a folder holding its packages, e.g. the bundle of ../shared/gpu/unsloth-site.sh)
All: LoRA r16 (alpha 32) on all linear layers, AdamW on the adapters, the model in train mode.

Fixed shape: batch x seq random tokens, every one a real token and a label. Real-length (--real): Alpaca-like
examples (benchmarks/common.py); plain pads batches of `batch` examples, ours packs examples into `batch` rows of
`seq` tokens; tokens/s counts real tokens only. Prints one RESULT line per run and a table at the end.
"""

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import common  # first: it puts the project root on sys.path
import torch
from common import ROOT, emit, llama_config, peak_gib, reset_peak, sync, versions

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_shape_args(p)
    g = p.add_argument_group("Run")
    g.add_argument("--stacks", default="plain,ours,unsloth", help="comma-separated: plain, ours, unsloth")
    g.add_argument("--ckpt", choices=["on", "off", "both"], default="both", help="gradient checkpointing")
    g.add_argument("--batch", type=int, default=8, help="sequences (rows) per step")
    g.add_argument("--seq", type=int, default=512, help="tokens per sequence (row)")
    g.add_argument("--steps", type=int, default=6, help="timed optimizer steps per run")
    g.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator)")
    g.add_argument("--lora_r", type=int, default=16, help="LoRA rank (alpha = 2 x r)")
    g.add_argument("--real", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the real-length (Alpaca-like) comparison, checkpointing on")
    g.add_argument("--plain_dropouts", default="0.05,0", help="LoRA dropouts the plain stack runs with")
    g.add_argument("--loss_steps", type=int, default=20, help="steps of the loss-curve check: plain (dropout 0) and "
                   "ours from the same adapter init on the same batches, checkpointing on; 0 = skip")
    g.add_argument("--transfer", choices=["pinned", "blocking"], default="pinned",
                   help="how every stack moves each batch to the GPU: pinned = from pinned memory without waiting "
                        "(finetune.py's setting), blocking = tensor.to(device), which waits for the previous step "
                        "(the HF Trainer's defaults)")
    g.add_argument("--park", choices=["on", "off", "both"], default="on",
                   help="ours: what checkpointed layers keep (input, middle residual) parked in CPU memory "
                        "(the default) or kept on the GPU")
    g.add_argument("--workdir", default=None, help="where the random checkpoint is saved (default: /dev/shm or /tmp)")
    g.add_argument("--unsloth_site", default="/tmp/uns", help="folder with unsloth's packages, put first on its "
                                                               "PYTHONPATH (skipped when unsloth is not there)")
    g.add_argument("--timeout", type=int, default=420, help="seconds allowed for each stack's process")
    g.add_argument("--profile", action="store_true", help="also profile two steps of ours in each "
                   "checkpointing mode run (and of plain, checkpointing on): the top GPU kernels, host waits, memory")
    g.add_argument("--profile_cpu", action=argparse.BooleanOptionalAction, default=True,
                   help="with --profile: also record every CPU op (the CPU tables); --no-profile_cpu records only "
                        "the GPU's kernels and the CUDA launch calls, which slows the CPU far less, so the gaps in "
                        "the trace are nearer to an unprofiled step's (without a GPU: ignored)")
    g.add_argument("--trace_dir", default=None, help="with --profile: also write each profile's Chrome trace "
                   "(ours-ckpt-<on|off>.json.gz) here, for benchmarks/trace_breakdown.py")
    g.add_argument("--json", default=None, help="also write all results to this file")
    g.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------
# The three stacks (each in its own process)
# ---------------------------------------------------------------------------------------------------------

def load_plain(path, args):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=dtype,
                                                 device_map={"": 0 if torch.cuda.is_available() else "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.05,
                                             target_modules="all-linear", bias="none", task_type="CAUSAL_LM"))
    return model


def set_plain_dropout(model, p):
    from torch import nn
    for m in model.modules():
        if hasattr(m, "lora_dropout"):
            for name in m.lora_dropout:
                m.lora_dropout[name] = nn.Dropout(p) if p > 0 else nn.Identity()


def ours_name(park):
    return "ours" if park else "ours (inputs kept on GPU)"


def load_ours(path, args, park=True):
    from peft import get_peft_model

    from utils import speed
    from utils.modeling import load_model
    model, _, _ = load_model(path, bits=4, training=True)
    speed.prepare_model(model)
    model = get_peft_model(model, speed.lora_config(4, r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                                    target_modules="all-linear", bias="none",
                                                    task_type="CAUSAL_LM"))
    return model, speed.TrainingSpeedups(model, park_inputs=park)


def set_checkpointing(model, on):
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    model.train()


def autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16) if torch.cuda.is_available() \
        else torch.autocast("cpu", enabled=False)


def to_device(batch, device, args):
    """A dict of CPU tensors on `device`, as --transfer says."""
    if args.transfer == "pinned" and torch.cuda.is_available():
        return {k: v.pin_memory().to(device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in batch.items()}
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def compiled_graphs():
    """How many graphs torch.compile has compiled in this process so far (recompilations included)."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def timed(step, batches, args):
    """Run `step` on warmup + timed batches; tokens/s over the timed ones, peak GiB over all, and how many
    graphs torch.compile compiled during the timed steps (then the figure includes compile time: a shape that
    went on changing after the warm-up; the table flags it)."""
    if len(batches) <= args.warmup:
        raise SystemExit(f"only {len(batches)} batches for {args.warmup} warmup steps")
    reset_peak()
    for b in batches[:args.warmup]:
        step(b)
    sync()
    graphs = compiled_graphs()
    started = time.perf_counter()
    tokens = 0
    for b in batches[args.warmup:]:
        tokens += step(b)
    sync()
    seconds = time.perf_counter() - started
    steps = len(batches) - args.warmup
    return {"tokens_per_s": tokens / seconds, "peak_gib": peak_gib(), "step_s": seconds / steps, "steps": steps,
            "compiled_while_timed": compiled_graphs() - graphs}


def loss_curve(model, step, batches, args):
    """Losses of args.loss_steps optimizer steps from one fixed adapter init (A seeded by parameter name order,
    B = 0, as peft initializes it), so plain and ours can be compared step by step."""
    g = torch.Generator().manual_seed(1234)
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            with torch.no_grad():
                a = torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5
                p.copy_((torch.zeros(p.shape) if "lora_B" in name else a).to(p.dtype))
    losses = []
    for b in batches[:args.loss_steps]:
        step(b, losses)
    return [round(x, 5) for x in losses]


def profile(step, batch, name, trace=None, cpu=True):
    """Two steps under torch.profiler: the kernels that take the GPU time, and the step's CPU time; with
    `trace`, the Chrome trace is written there (gzipped). cpu=False on a GPU: only the kernels and the CUDA
    launch calls are recorded (no CPU table), which slows the CPU far less."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    step(batch)
    sync()
    cpu = cpu or not torch.cuda.is_available()  # without a GPU there is nothing else to record
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cpu else [ProfilerActivity.CUDA]
    with torch_profile(activities=activities) as prof:
        for _ in range(2):
            step(batch)
        sync()
    print(f"=== profile: {name} (2 steps) ===")
    if trace:
        os.makedirs(os.path.dirname(trace) or ".", exist_ok=True)
        prof.export_chrome_trace(trace)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
    if cpu:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=70),
              flush=True)
    if not torch.cuda.is_available():
        return
    from utils.profiling import gpu_idle  # here: unsloth's worker must import unsloth before transformers
    print("GPU idle within the 2 steps:", json.dumps(gpu_idle(prof)), flush=True)
    waits = common.host_waits(lambda: step(batch))
    print(f"CPU waits for the GPU in one step: {sum(waits.values())}", flush=True)
    for where, count in sorted(waits.items(), key=lambda kv: -kv[1]):
        print(f"  {count} x {where}")
    sync()
    mem = common.memory_at_peak(lambda: (step(batch), sync()))
    print(f"memory: {mem['before_gib']:.2f} GiB before the step, peak {mem['peak_gib']:.2f} GiB; alive at the peak "
          "(MiB, blocks, allocated at):", flush=True)
    for size, count, where in mem["alive_at_peak"]:
        print(f"  {size:9.1f} {count:5d}  {where}", flush=True)


def fixed_batches(args, vocab, n=None):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (args.batch, args.seq), generator=g) for _ in range(n or args.warmup + args.steps)]


def real_batches(args, vocab, rows_per_step):
    """Enough Alpaca-like examples for warmup + steps, grouped `rows_per_step` at a time by the caller."""
    n = (args.warmup + args.steps) * args.batch * max(4, args.seq // 40)  # more than packing needs
    lengths = common.alpaca_like_lengths(n, seed=2, cutoff=args.seq)
    return common.random_examples(lengths, vocab, seed=3), common.length_stats(lengths)


def run_plain(path, args, config):
    model = load_plain(path, args)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)

    def step(ids_or_batch, losses=None):
        batch = ids_or_batch if isinstance(ids_or_batch, dict) else \
            {"input_ids": ids_or_batch, "labels": ids_or_batch}
        batch = to_device(batch, model.device, args)
        with autocast():
            loss = model(**batch).loss
        loss.backward()
        if losses is not None:
            losses.append(loss.item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else batch["input_ids"].numel()

    dropouts = [float(x) for x in args.plain_dropouts.split(",") if x]
    for ckpt in ckpt_settings(args):
        set_checkpointing(model, ckpt)
        for p in dropouts:
            set_plain_dropout(model, p)
            res = timed(step, fixed_batches(args, config.vocab_size), args)
            emit(dict(stack="plain", data="fixed", ckpt=ckpt, dropout=p, **res))
            if args.profile and ckpt and p == dropouts[0]:
                profile(step, fixed_batches(args, config.vocab_size)[0], f"plain, checkpointing on, dropout {p}",
                        cpu=args.profile_cpu)
    if args.loss_steps:
        set_checkpointing(model, True)
        set_plain_dropout(model, 0.0)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
        batches = fixed_batches(args, config.vocab_size, args.loss_steps)
        emit(dict(stack="plain", data="losses", losses=loss_curve(model, step, batches, args)))
    if args.real:
        from utils.data import pad_collate

        class Pad:
            pad_token_id = 0
        set_checkpointing(model, True)
        set_plain_dropout(model, dropouts[0])
        examples, stats = real_batches(args, config.vocab_size, args.batch)
        collate = pad_collate(Pad())
        batches = [collate(examples[i:i + args.batch]) for i in range(0, len(examples), args.batch)]
        batches = [b for b in batches if len(b["input_ids"]) == args.batch][:args.warmup + args.steps]
        for b in batches:
            b.pop("position_ids", None)
        res = timed(step, batches, args)
        padded = sum(b["input_ids"].numel() for b in batches[args.warmup:])
        real = sum(int(b["attention_mask"].sum()) for b in batches[args.warmup:])
        emit(dict(stack="plain", data="real", ckpt=True, dropout=dropouts[0], real_share=round(real / padded, 3),
                  lengths=stats, **res))


def run_ours(path, args, config, park):
    from utils.speed import packed_collate
    model, sp = load_ours(path, args, park)
    print(sp.describe(), flush=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4,
                            fused=torch.cuda.is_available())
    collate = packed_collate(row_tokens=args.seq, logits_to_keep=1 if sp.loss_func else None)
    dev = model.get_input_embeddings().weight.device

    def step(examples, losses=None):
        batch = to_device(collate(examples), dev, args)
        labels = batch.pop("labels") if sp.loss_func else None
        with autocast():
            out = model(**batch)
        if sp.loss_func:
            loss = sp.loss_func(out, labels, (labels[:, 1:] != -100).sum())
        else:
            loss = out.loss
        loss.backward()
        if losses is not None:
            losses.append(loss.item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        return sum(len(e["input_ids"]) for e in examples)

    def as_examples(ids):
        return [{"input_ids": r, "labels": r} for r in ids.tolist()]

    for ckpt in ckpt_settings(args):
        set_checkpointing(model, ckpt)
        batches = [as_examples(ids) for ids in fixed_batches(args, config.vocab_size)]
        emit(dict(stack=ours_name(park), data="fixed", ckpt=ckpt, dropout=0.0, **timed(step, batches, args)))
        if args.profile:
            trace = args.trace_dir and os.path.join(args.trace_dir, f"ours-ckpt-{'on' if ckpt else 'off'}.json.gz")
            profile(step, batches[0], f"{ours_name(park)}, checkpointing {'on' if ckpt else 'off'}", trace,
                    args.profile_cpu)
    if args.loss_steps and park:
        set_checkpointing(model, True)
        batches = [as_examples(ids) for ids in fixed_batches(args, config.vocab_size, args.loss_steps)]
        emit(dict(stack="ours", data="losses", losses=loss_curve(model, step, batches, args)))
    if not park:
        return
    if args.real:
        set_checkpointing(model, True)
        examples, stats = real_batches(args, config.vocab_size, args.batch)
        batches, group, rows, used = [], [], 1, 0
        for ex in examples:  # consecutive examples filling `batch` rows of `seq` tokens, as packed_collate rows
            n = len(ex["input_ids"])
            if used + n > args.seq:
                rows, used = rows + 1, 0
            if rows > args.batch:
                batches.append(group)
                group, rows, used = [], 1, 0
            group.append(ex)
            used += n
        batches = batches[:args.warmup + args.steps]
        emit(dict(stack="ours", data="real", ckpt=True, dropout=0.0, lengths=stats, **timed(step, batches, args)))


def run_unsloth(path, args, config, ckpt):
    from unsloth import FastLanguageModel  # must come before transformers
    model, _ = FastLanguageModel.from_pretrained(model_name=path, max_seq_length=args.seq, dtype=torch.bfloat16,
                                                 load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0,
                                             target_modules=TARGETS, bias="none", random_state=0,
                                             use_gradient_checkpointing="unsloth" if ckpt else False)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)

    def step(ids):
        ids = to_device({"ids": ids}, model.device, args)["ids"]
        with autocast():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return ids.numel()

    emit(dict(stack="unsloth", data="fixed", ckpt=ckpt, dropout=0.0,
              **timed(step, fixed_batches(args, config.vocab_size), args)))


def ckpt_settings(args):
    return {"on": [True], "off": [False], "both": [True, False]}[args.ckpt]


# ---------------------------------------------------------------------------------------------------------
# The parent: checkpoint once, one process per stack, the table
# ---------------------------------------------------------------------------------------------------------

def worker(args):
    config = llama_config(args)
    path = args.workdir
    torch.manual_seed(0)
    if args.worker == "plain":
        run_plain(path, args, config)
    elif args.worker in ("ours", "ours-nopark"):
        run_ours(path, args, config, park=args.worker == "ours")
    else:
        run_unsloth(path, args, config, ckpt=args.worker == "unsloth-ckpt")
    gc.collect()


def spawn(stack, args, argv):
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cwd = ROOT
    if stack.startswith("unsloth"):
        env["PYTHONPATH"] = os.pathsep.join(x for x in (args.unsloth_site, env.get("PYTHONPATH")) if x)
        env["UNSLOTH_DISABLE_STATISTICS"] = "1"
        cwd = args.workdir  # it writes a compile cache into the working directory
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", stack, "--workdir", args.workdir]
    started = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=args.timeout)
        out, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, code = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
    results = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    print(f"--- {stack}: exit {code}, {time.time() - started:.0f} s, {len(results)} result(s)", flush=True)
    for r in results:
        emit(r)
    tail = "\n".join(line for line in out.splitlines() if not line.startswith("RESULT "))[-4000:]
    if code != 0 or not results:
        print(tail, flush=True)
    else:
        for line in out.splitlines():
            if line.startswith("speed-ups:"):
                print(line, flush=True)
        if "=== profile" in out:
            print(out[out.index("=== profile"):], flush=True)
    return results


def unsloth_available(site):
    return bool(site) and os.path.isdir(os.path.join(site, "unsloth"))


def table(results, args):
    timed_rows = [r for r in results if r["data"] != "losses"]
    base = {(r["data"], r["ckpt"], r["dropout"] > 0): r for r in timed_rows if r["stack"] == "plain"}
    rows = ["| stack | data | checkpointing | LoRA dropout | tokens/s | peak GiB | vs plain, dropout 0.05 | "
            "vs plain, dropout 0 |", "|---|---|---|---|---|---|---|---|"]
    for r in timed_rows:
        ratios = []
        for with_dropout in (True, False):
            b = base.get((r["data"], r["ckpt"], with_dropout))
            ratios.append(f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x" if b else "-")
        kind = f"{args.batch}x{args.seq} random" if r["data"] == "fixed" else "Alpaca-like, real tokens"
        rows.append(f"| {r['stack']} | {kind} | {'on' if r['ckpt'] else 'off'} | {r['dropout']} | "
                    f"{r['tokens_per_s']:,.0f} | {r['peak_gib']:.1f} | {' | '.join(ratios)} |")
    for r in timed_rows:
        if r.get("compiled_while_timed"):
            rows.append(f"warning: {r['stack']} ({r['data']} data, checkpointing {'on' if r['ckpt'] else 'off'}) "
                        f"compiled {r['compiled_while_timed']} graph(s) during its timed steps, so its figure "
                        "includes compile time; run again with a larger --warmup")
    curves = {r["stack"]: r["losses"] for r in results if r["data"] == "losses"}
    if len(curves) == 2:
        plain, ours = curves["plain"], curves["ours"]
        diffs = [abs(a - b) for a, b in zip(plain, ours)]
        relative = max(d / abs(a) for d, a in zip(diffs, plain))
        rows += ["", f"Loss check ({len(diffs)} steps from the same adapter init, same batches, checkpointing on; "
                 "plain dropout 0 vs ours):", f"  plain: {plain}", f"  ours:  {ours}",
                 f"  largest difference {max(diffs):.4f} (relative {relative:.2e})"]
    return "\n".join(rows)


def main(args, argv):
    if args.worker:
        return worker(args)
    config = llama_config(args)
    args.workdir = args.workdir or common.default_workdir()
    os.makedirs(args.workdir, exist_ok=True)
    print("versions:", json.dumps(versions()), flush=True)
    print(f"batches reach the GPU: {args.transfer} (--transfer), the same for every stack", flush=True)
    common.build_checkpoint(args.workdir, config)
    results = []
    for stack in [s.strip() for s in args.stacks.split(",") if s.strip()]:
        if stack == "unsloth":
            if not torch.cuda.is_available() or not unsloth_available(args.unsloth_site):
                print(f"--- unsloth: skipped (needs a GPU and its packages in {args.unsloth_site})", flush=True)
                continue
            for ckpt in ckpt_settings(args):
                results += spawn("unsloth-ckpt" if ckpt else "unsloth-nockpt", args, argv)
        elif stack == "ours":
            for park in {"on": [True], "off": [False], "both": [True, False]}[args.park]:
                results += spawn("ours" if park else "ours-nopark", args, argv)
        else:
            results += spawn(stack, args, argv)
        if args.json:  # after every stack, so a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump({"versions": versions(), "args": vars(args), "results": results}, f, indent=1)
    print(table(results, args), flush=True)
    return results


if __name__ == "__main__":
    main(parse_args(), sys.argv[1:])
