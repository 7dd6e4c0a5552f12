"""QLoRA / LoRA fine-tuning of a LLaMA-family causal LM on instruction data.

One GPU, or the CPU (a tiny offline run on the bundled model and the sample data):
    python finetune.py
    python finetune.py --base_model path/to/llama --data_path dataset/sample.json --output_dir output/
    python finetune.py --data_path dataset/sample_sharegpt.json dataset/sample_messages.jsonl  # conversations
Several GPUs, data parallel (each process holds its own 4-bit copy):
    torchrun --nproc_per_node=2 finetune.py --base_model ... --data_path ...
    accelerate launch finetune.py --base_model ... --data_path ...
The final adapter lands in <output_dir>/checkpoint-final; every checkpoint-N is a loadable adapter too.
"""

import argparse
import dataclasses
import math
import os
import sys
import time

# only light modules here, so that --help and flag errors come at once; torch and transformers load in main()
from utils.args import FORMATS, OVERLONG, UserError, add_bool, add_model_args, resolve_bits, run_main
from utils.checkpoints import checkpoint_problem, latest_complete_checkpoint, step_checkpoints

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dataset", "sample.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, inference=False)
    g = p.add_argument_group("Data")
    g.add_argument("--data_path", nargs="+", default=[DEFAULT_DATA],
                   help="one or more data files, mixed (space- or comma-separated): JSON list, JSONL, .parquet, "
                        "or a folder written by datasets' save_to_disk; records in Alpaca, ShareGPT or messages "
                        "format (see dataset/README.md)")
    g.add_argument("--data_format", default="auto", choices=("auto", *FORMATS),
                   help="record format of every file; auto = detect each file's from its first record")
    g.add_argument("--prompt_template", default="auto",
                   help="alpaca, chat, chatml, llama2, llama3, tokenizer (the tokenizer's chat template), a .json "
                        "template path, or auto (= tokenizer if it has a chat template, else alpaca)")
    g.add_argument("--cutoff_len", type=int, default=512, help="longest example in tokens")
    g.add_argument("--overlong", default="truncate", choices=OVERLONG,
                   help="records longer than --cutoff_len: truncate (default; cut at the limit) or drop. A record "
                        "whose answers all lie beyond the limit is always dropped")
    g.add_argument("--val_set_size", type=float, default=0,
                   help="records held out for evaluation: a count, or a fraction when < 1 (0 = none)")
    add_bool(g, "--train_on_inputs", False,
             "also train on prompts, system and user turns (default: only the assistant turns, every one of them)")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora_r", type=int, default=16, help="adapter rank")
    g.add_argument("--lora_alpha", type=int, default=32, help="adapter scale numerator (scale = alpha / r)")
    g.add_argument("--lora_dropout", type=float, default=0.0,
                   help="dropout on the adapter input; 0 (default) keeps the fused LoRA layers of --speedups, "
                        "> 0 uses peft's own (slower) layers")
    g.add_argument("--lora_target_modules", default="all-linear",
                   help="comma-separated module names (e.g. q_proj,v_proj), or all-linear (default)")
    g = p.add_argument_group("Training")
    g.add_argument("--output_dir", "--output_path", dest="output_dir", default="output",
                   help="where checkpoints go (--output_path is the original tool's spelling)")
    g.add_argument("--per_device_train_batch_size", "--micro_batch_size", type=int, default=4,
                   help="examples per process per forward pass")
    g.add_argument("--gradient_accumulation_steps", type=int, default=4,
                   help="micro-batches per optimizer step; effective batch = world size x micro-batch x this")
    g.add_argument("--num_train_epochs", type=float, default=3, help="passes over the data")
    g.add_argument("--max_steps", type=int, default=-1, help="optimizer steps; overrides epochs when > 0")
    g.add_argument("--learning_rate", type=float, default=2e-4, help="peak learning rate")
    g.add_argument("--warmup_ratio", type=float, default=0.03, help="fraction of steps spent warming up")
    g.add_argument("--lr_scheduler_type", default="cosine", help="linear, cosine, constant, ...")
    g.add_argument("--optim", default="auto",
                   help="optimizer name as the HF Trainer spells it; auto = paged_adamw_32bit on GPU, "
                        "adamw_torch on CPU")
    add_bool(g, "--gradient_checkpointing", True, "recompute activations in the backward pass to save memory")
    add_bool(g, "--speedups", True, "each decoder layer as one compiled function (fused LoRA over NF4, RMSNorm, "
             "SwiGLU; checkpointed inputs kept in CPU memory), a chunked loss on labelled tokens and packed "
             "micro-batches (utils/speed.py, utils/fused_layer.py; BENCHMARKS.md); --no-speedups = plain peft recipe")
    g.add_argument("--keep_dequantized", default="auto", choices=("auto", "on", "off"),
                   help="with --speedups and --no-gradient_checkpointing: keep each layer's dequantized 4-bit "
                        "weights from the forward pass for the backward pass instead of dequantizing them again "
                        "(~2%% faster on a 7B, ~390 MiB more per 7B layer); auto = as many layers as fit in 90%% of "
                        "the GPU's memory, decided at the second step (none on a CPU) (default: auto)")
    g.add_argument("--logging_steps", type=int, default=None,
                   help="log the loss every N optimizer steps (default: 10, or fewer so a short run logs >= 10 "
                        "points)")
    g.add_argument("--save_steps", type=int, default=200, help="write checkpoint-N every N optimizer steps")
    g.add_argument("--save_total_limit", type=int, default=3,
                   help="keep the newest N complete checkpoint-N folders (0 = keep all); an old one is removed "
                        "only after a newer one is completely written")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="a checkpoint-N folder, or 'latest' for the newest one in --output_dir")
    add_bool(g, "--overwrite_output_dir", False, "allow a new run in an output dir that holds checkpoints")
    g.add_argument("--seed", type=int, default=42, help="seed for LoRA init, dropout and data order")
    g.add_argument("--eval_steps", type=int, default=None,
                   help="evaluate on the held-out records every N optimizer steps (default: --save_steps)")
    g.add_argument("--early_stopping_patience", type=int, default=0,
                   help="stop after N evaluations without a lower eval loss and keep the best checkpoint as "
                        "checkpoint-final (0 = off; needs --val_set_size)")
    g.add_argument("--report_to", default="auto",
                   help="tensorboard, wandb, ... (comma-separated) or none; auto = tensorboard when installed "
                        "(logs in <output_dir>/runs)")
    g.add_argument("--profile_steps", default=None, metavar="A-B",
                   help="run the PyTorch profiler over optimizer steps A to B and write, per process, a trace and "
                        "a table of where the time (and, on a GPU, the peak memory) went into <output_dir>/profile "
                        "(e.g. 10-12)")
    return p.parse_args(argv)


def validate_args(args):
    """Every problem with the flags at once, before anything heavy happens."""
    problems = []
    for flag in ("cutoff_len", "per_device_train_batch_size", "gradient_accumulation_steps", "lora_r",
                 "lora_alpha", "logging_steps", "save_steps", "eval_steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            problems.append(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.save_total_limit < 0:
        problems.append(f"--save_total_limit must be >= 0 (0 = keep all), got {args.save_total_limit}")
    if not 0 <= args.lora_dropout < 1:
        problems.append(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    if args.learning_rate <= 0:
        problems.append(f"--learning_rate must be > 0, got {args.learning_rate}")
    if args.max_steps <= 0 and args.num_train_epochs <= 0:
        problems.append("give --num_train_epochs > 0 or --max_steps > 0")
    if args.val_set_size < 0 or (args.val_set_size >= 1 and args.val_set_size != int(args.val_set_size)):
        problems.append(f"--val_set_size must be a count or a fraction in (0, 1), got {args.val_set_size}")
    if args.early_stopping_patience < 0:
        problems.append(f"--early_stopping_patience must be >= 0, got {args.early_stopping_patience}")
    elif args.early_stopping_patience and not args.val_set_size:
        problems.append("--early_stopping_patience needs held-out records: pass --val_set_size too")
    elif args.early_stopping_patience and args.eval_steps and args.save_steps % args.eval_steps:
        problems.append(f"--early_stopping_patience keeps the best checkpoint, so --save_steps ({args.save_steps}) "
                        f"must be a multiple of --eval_steps ({args.eval_steps})")
    # a path that exists is taken whole (it may hold a comma); anything else is split at commas
    args.data_path = [part.strip() for value in args.data_path
                      for part in ([value] if os.path.exists(value) else value.split(",")) if part.strip()]
    problems += [f"--data_path: file not found: {path}" for path in args.data_path if not os.path.exists(path)]
    if not args.data_path:
        problems.append("--data_path: no file given")
    if args.resume_from_checkpoint and args.resume_from_checkpoint != "latest" \
            and not os.path.isdir(args.resume_from_checkpoint):
        problems.append(f"--resume_from_checkpoint: no such folder: {args.resume_from_checkpoint}")
    if args.profile_steps is not None:
        from utils.profiling import parse_steps
        try:
            args.profile_window = parse_steps(args.profile_steps)
        except ValueError as e:
            problems.append(f"--profile_steps: {e}")
    if problems:
        raise UserError("; ".join(problems))
    args.bits = resolve_bits(args, default=4)
    if args.resume_from_checkpoint == "latest":
        latest = latest_complete_checkpoint(args.output_dir)
        if latest is None:
            raise UserError(f"--resume_from_checkpoint latest: {args.output_dir} holds no complete checkpoint-N")
        args.resume_from_checkpoint = latest
    elif args.resume_from_checkpoint:
        problem = checkpoint_problem(args.resume_from_checkpoint)
        if problem:
            raise UserError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: cannot resume exactly "
                            f"from it ({problem})")
    elif step_checkpoints(args.output_dir) and not args.overwrite_output_dir:
        raise UserError(f"{args.output_dir} already holds checkpoints of another run: pass "
                        "--resume_from_checkpoint latest to continue it, --overwrite_output_dir to start over "
                        "in it, or another --output_dir")


def main(args):
    validate_args(args)
    from utils import data as D
    from utils.modeling import distributed_local_rank, load_tokenizer, resolve_model_path
    from utils.prompts import load_template
    is_main = (distributed_local_rank() or 0) == 0 and int(os.environ.get("RANK", "0")) == 0
    log = print if is_main else (lambda *a, **k: None)

    # ---- data: read and check every record before any model is loaded ----
    conversations, data_files = D.load_dataset(args.data_path, args.data_format, log=log)
    model_path = resolve_model_path(args.base_model, args.local_files_only)
    tokenizer = load_tokenizer(model_path, local_files_only=args.local_files_only,
                               trust_remote_code=args.trust_remote_code)
    template = load_template(args.prompt_template, tokenizer)
    examples = D.tokenize_records(conversations, tokenizer, template, args.cutoff_len,
                                  train_on_inputs=args.train_on_inputs, overlong=args.overlong, log=log)
    train_examples, val_examples = D.split_train_val(examples, args.val_set_size, args.seed)
    train_set = D.TokenizedDataset(train_examples)
    val_set = D.TokenizedDataset(val_examples) if val_examples else None
    log(f"data: {len(train_set)} training / {len(val_set or [])} validation examples, "
        f"template '{template.name}', cutoff {args.cutoff_len} tokens")

    # ---- model: quantized base + LoRA adapters ----
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import EarlyStoppingCallback, TrainingArguments, set_seed

    from utils import speed
    from utils.modeling import compute_dtype, load_model, select_process_gpu, sharding_here
    from utils.training import (
        GracefulStop,
        MetaCallback,
        Throughput,
        Trainer,
        adapter_meta,
        finish_run,
        max_over_processes,
        one_gpu_per_process,
        report_targets,
    )
    set_seed(args.seed)
    select_process_gpu()
    model, _, info = load_model(args.base_model, bits=args.bits, training=True,
                                local_files_only=args.local_files_only, trust_remote_code=args.trust_remote_code,
                                allow_pickle=args.allow_pickle)
    ckpt_kwargs = {"use_reentrant": False}  # re-entrant checkpointing breaks DDP (pitfall 6)
    sharded = sharding_here()
    # the fused path is for one model copy per GPU; fp16 GPUs keep peft's fp32-norm recipe; under FSDP a part of
    # the speed-ups applies (TrainingSpeedups(fsdp=True)), under ZeRO-3 none (it partitions the output layer too)
    fast = args.speedups and speed.fast_path_dtype_ok() and not sharded
    fsdp_speedups = args.speedups and speed.fast_path_dtype_ok() and sharded == "fsdp"
    if fast:
        model = speed.prepare_model(model)  # frozen in its compute dtype; the Trainer turns on checkpointing
    elif args.bits in (4, 8) and not sharded:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=ckpt_kwargs)
    elif args.gradient_checkpointing:
        # FSDP / ZeRO-3 need one dtype per wrapped block, so nothing is upcast to fp32 here
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
        model.enable_input_require_grads()
    targets = args.lora_target_modules
    targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    try:
        model = get_peft_model(model, speed.lora_config(args.bits, fused=fast, r=args.lora_r,
                                                        lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                                        target_modules=targets, bias="none", task_type="CAUSAL_LM"),
                               autocast_adapter_dtype=not sharded)
    except ValueError as e:
        raise UserError(f"--lora_target_modules {args.lora_target_modules}: {e}") from None
    trainable, total = model.get_nb_trainable_parameters()
    log(f"model: {args.base_model} ({info['path']}), {args.bits}-bit on {info['where']}; "
        f"LoRA r={args.lora_r} on {targets}: {trainable:,} trainable of {total:,} parameters")
    speedups = speed.TrainingSpeedups(model, keep_dequantized=args.keep_dequantized) if fast else \
        speed.TrainingSpeedups(model, fsdp=True) if fsdp_speedups else None
    log(speedups.describe() if speedups else "speed-ups: off (--no-speedups, an fp16 GPU, or ZeRO-3)")
    if speedups and speedups.fsdp_wrap:  # read by peft's FSDP wrap policy when the Trainer wraps the model
        os.environ["FSDP_TRANSFORMER_CLS_TO_WRAP"] = ",".join(speedups.fsdp_wrap)

    # ---- train ----
    dtype = compute_dtype()
    ckpt_flag = "activation_checkpointing" if "activation_checkpointing" in \
        {f.name for f in dataclasses.fields(TrainingArguments)} else "gradient_checkpointing"
    # packed micro-batches hold no padding at all (and no attention mask): count every token; padded ones count
    # the attention mask (counting "not the pad id" would miss real tokens equal to it, e.g. <unk> as pad)
    tokens_seen = "all" if speedups and speedups.packing else "non_padding"
    training_args = TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps, learning_rate=args.learning_rate, warmup_steps=args.warmup_ratio,
        lr_scheduler_type=args.lr_scheduler_type, optim=_optimizer(args.optim),
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, use_cpu=not torch.cuda.is_available(),
        **{ckpt_flag: args.gradient_checkpointing}, gradient_checkpointing_kwargs=ckpt_kwargs,
        logging_steps=args.logging_steps or 10, save_strategy="steps", save_steps=args.save_steps,
        save_total_limit=None, eval_strategy="steps" if val_set else "no",
        eval_steps=args.eval_steps or args.save_steps, seed=args.seed, data_seed=args.seed,
        report_to=report_targets(args.report_to, log), include_num_input_tokens_seen="no",  # Trainer(count_tokens=)
        # no GPU->CPU waits between steps: NaN losses are logged as NaN (not replaced by the running mean), and
        # batches are copied to the GPU from pinned memory without blocking
        logging_nan_inf_filter=False, dataloader_pin_memory=torch.cuda.is_available(),
        accelerator_config={"non_blocking": True},
        load_best_model_at_end=bool(args.early_stopping_patience), metric_for_best_model="eval_loss",
        greater_is_better=False,
        remove_unused_columns=False, ddp_find_unused_parameters=False, label_names=["labels"],
    )
    one_gpu_per_process(training_args)
    world = training_args.world_size
    if args.logging_steps is None:
        per_step = world * args.per_device_train_batch_size * args.gradient_accumulation_steps
        steps = args.max_steps if args.max_steps > 0 else math.ceil(len(train_set) / per_step * args.num_train_epochs)
        training_args.logging_steps = max(1, min(10, steps // 10))
    log(f"effective batch size: {world} process(es) x {args.per_device_train_batch_size} micro-batch x "
        f"{args.gradient_accumulation_steps} accumulation = "
        f"{world * args.per_device_train_batch_size * args.gradient_accumulation_steps}")
    meta = adapter_meta(args, template, model_path)
    meta["data"] = {"files": data_files, "overlong": args.overlong, "examples": len(examples)}
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set, eval_dataset=val_set,
                      data_collator=speedups.collator(tokenizer) if speedups else D.pad_collate(tokenizer),
                      compute_loss_func=speedups.loss_func if speedups else None, processing_class=tokenizer,
                      count_tokens=tokens_seen, saved_tensors=speedups.saved_tensors if speedups else None,
                      callbacks=[MetaCallback(meta, keep=args.save_total_limit), stopper := GracefulStop(),
                                 throughput := Throughput()])
    if args.profile_steps is not None:
        from utils.profiling import StepProfiler
        first, last = args.profile_window
        trainer.add_callback(StepProfiler(first, last, os.path.join(args.output_dir, "profile"),
                                          rank=training_args.process_index))
        log(f"profiling optimizer steps {first}-{last} into {os.path.join(args.output_dir, 'profile')}")
    if args.early_stopping_patience:
        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=args.early_stopping_patience))
        log(f"early stopping: after {args.early_stopping_patience} evaluations without a lower eval loss; "
            "checkpoint-final will hold the best checkpoint's adapter")
    if args.resume_from_checkpoint:
        log(f"resuming from {args.resume_from_checkpoint}")
    started = time.time()
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    # before the final save; the processes' peaks differ under FSDP / ZeRO-3, and the summary (written by
    # process 0) reports the largest
    peak_gpu = tuple(max_over_processes(b) for b in throughput.gpu_peaks()) if torch.cuda.is_available() else None
    if stopper.signum is not None:
        log(f"stopped at step {trainer.state.global_step}; checkpoint saved in {args.output_dir}. Continue with "
            "the same command plus --resume_from_checkpoint latest")
        sys.exit(128 + stopper.signum)

    if val_set is not None:
        evals = [h for h in trainer.state.log_history if "eval_loss" in h]
        if args.early_stopping_patience:
            log(f"best eval loss {trainer.state.best_metric:.4f} at {trainer.state.best_model_checkpoint}")
        elif not evals or evals[-1]["step"] != trainer.state.global_step:
            evals.append(trainer.evaluate())  # the end of training, unless the last periodic eval was there
        log(f"final eval: loss {evals[-1]['eval_loss']:.4f}, perplexity {evals[-1]['eval_perplexity']:.3f}")

    # ---- save: final adapter, loss plot, summary ----
    final_dir = finish_run(trainer, meta, time.time() - started, peak_gpu)
    log(f"final adapter: {final_dir}")
    return final_dir


def _optimizer(name):
    import torch
    if name != "auto":
        return name
    return "paged_adamw_32bit" if torch.cuda.is_available() else "adamw_torch"


if __name__ == "__main__":
    run_main(main, parse_args)
