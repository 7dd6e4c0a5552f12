"""Decoding speed at batch 1: transformers' `model.generate` against this project's streaming path
(`utils.chat.ChatModel.stream`, as cli_demo.py and gradio_ui.py run it) on a random LLaMA in bf16.

    python benchmarks/bench_decode.py                      # LLaMA-2-7B shape on the GPU
    python benchmarks/bench_decode.py --hf_static          # also generate(cache_implementation="static")
    python benchmarks/bench_decode.py --bits 4 --lora_r 16       # NF4 base + a LoRA adapter, as chat loads QLoRA
    python benchmarks/bench_decode.py --shape tiny --turns 2 --max_new_tokens 16 --baseline_tokens 8   # CPU

The conversation has --turns turns with user messages of different lengths (so prompt lengths vary), each
reply --max_new_tokens long (the random model's EOS logit is 0, never the greedy pick), greedy; the last turn
samples (temperature 0.7, top-p 0.9). Time to first token (TTFT) runs from the call to the first text delta;
tokens/s counts the tokens after the first over the time after the first delta. The first turn includes the
one-time work (kernel compilation, CUDA graph capture); later turns show a new prompt length costs nothing more.

Greedy check: the project's decoder and `generate` from the same prompt, token for token; and, teacher-forced,
the logit of each token the decoder chose against the best logit of one full forward pass (bf16 rounding can
swap near-ties on a random model; the deficit says how near).
"""

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time

import common  # first: it puts the project root on sys.path
import torch
from common import emit, llama_config, random_model, sync, versions, word_tokenizer
from transformers.generation.streamers import BaseStreamer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_shape_args(p)
    g = p.add_argument_group("Model")
    g.add_argument("--bits", type=int, choices=(16, 8, 4), default=16,
                   help="16: a random bf16 model built in memory; 4 or 8: the same saved to --workdir and loaded "
                        "quantized through utils/modeling.py, as cli_demo.py loads a QLoRA base")
    g.add_argument("--lora_r", type=int, default=0,
                   help="also attach a random LoRA adapter of this rank on all linear layers (0: none)")
    g.add_argument("--workdir", default=None, help="where the checkpoint for --bits 4/8 is kept (default: "
                                                   "/dev/shm/llama-qlora-bench if it has room, else /tmp)")
    g = p.add_argument_group("Run")
    g.add_argument("--turns", type=int, default=6, help="conversation turns through the project's path")
    g.add_argument("--max_new_tokens", type=int, default=256, help="tokens per reply")
    g.add_argument("--baseline_tokens", type=int, default=128, help="tokens for the generate() baseline")
    g.add_argument("--verify_tokens", type=int, default=64, help="greedy tokens compared with generate()")
    g.add_argument("--message_words", default="40,300,80,600,20,150",
                   help="user message lengths in words, cycled over the turns")
    g.add_argument("--hf_static", action="store_true",
                   help="also time generate(cache_implementation='static') (compiles for a minute or more)")
    g.add_argument("--profile", action="store_true", help="also profile a 64-token reply after the turns: GPU "
                   "kernels by time and the GPU's idle time between them (CUDA only)")
    g.add_argument("--steady", default="", metavar="POSITIONS",
                   help="also time one decode step (a CUDA graph replay) at these comma-separated cache positions, "
                        "with the Triton attention kernels and with torch ops (GPU only), e.g. 256,1024,2048,4000")
    g.add_argument("--steady_reps", type=int, default=200, help="replays timed per position for --steady")
    g.add_argument("--json", default=None, help="also write the results to this file")
    return p.parse_args(argv)


class _Clock(BaseStreamer):
    """Records when generate() hands over the first new token."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self):
        pass


def time_generate(model, ids, n, **kwargs):
    x = torch.tensor([ids], device=model.device)
    clock = _Clock()
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, streamer=clock, **kwargs)
    sync()
    end = time.perf_counter()
    new = out[0, len(ids):].tolist()
    return {"ttft_s": clock.first - t0, "tokens_per_s": (len(new) - 1) / (end - clock.first),
            "new_tokens": len(new)}, new


def verify(model, tokenizer, ids, reference, n):
    """Greedy tokens of the project's decoder vs generate's `reference`; teacher-forced logit deficits."""
    from utils.decoder import fast_decoder
    from utils.generation import generation_kwargs
    engine = fast_decoder(model)
    if engine is None:
        return {"decoder": "off"}
    gen = generation_kwargs({"max_new_tokens": n, "temperature": 0}, tokenizer, model)
    assert engine.try_acquire()
    try:
        engine.cached = []  # no reuse: the same computation generate does
        ours = list(engine.generate(ids, gen, threading.Event()))
    finally:
        engine.release()
    same = next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), min(len(ours), len(reference)))
    with torch.inference_mode():
        logits = model(torch.tensor([ids + ours], device=model.device)).logits[0, len(ids) - 1:-1].float()
    best = logits.max(-1).values
    chosen = logits.gather(1, torch.tensor(ours, device=logits.device)[:, None])[:, 0]
    deficit = (best - chosen).tolist()
    top2 = logits.topk(2, dim=-1).values
    return {"compared": min(len(ours), len(reference)), "identical_prefix": same,
            "max_logit_deficit": round(max(deficit), 4), "not_argmax": sum(d > 0 for d in deficit),
            "median_top2_gap": round(float((top2[:, 0] - top2[:, 1]).median()), 4)}


def build_model(config, args):
    """(model, tokenizer) in eval mode: random bf16 weights (fp32 on the CPU), or for --bits 4/8 that checkpoint
    loaded quantized by the project's loader; with --lora_r, a random adapter (B not zero, so it counts)."""
    if args.bits == 16:
        model = random_model(config)
        tokenizer = word_tokenizer(config.vocab_size)
    else:
        from utils.modeling import load_model
        folder = common.build_checkpoint(os.path.join(args.workdir or common.default_workdir(),
                                                      f"decode-{config.num_hidden_layers}x{config.hidden_size}"),
                                         config)
        model, tokenizer, _ = load_model(folder, bits=args.bits)
    if args.lora_r:
        from peft import LoraConfig, get_peft_model
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                                 target_modules="all-linear", init_lora_weights=False,
                                                 task_type="CAUSAL_LM"))
    return model.eval(), tokenizer


def steady_steps(model, positions, reps):
    """Milliseconds per decode step at fixed cache positions, each variant's graphs captured first (untimed).
    Writes arbitrary keys and values into the cache, so the conversation held there is dropped afterwards."""
    from utils.decoder import fast_decoder
    engine = fast_decoder(model)
    if engine is None or not engine.use_graphs:
        return []
    rows, kernels = [], engine.kernels
    engine._ensure_capacity(min(max(positions) + 1, engine.ctx))
    token = torch.full((1, 1), 5, dtype=torch.long, device=engine.device)
    try:
        for use in ([True, False] if kernels else [False]):
            engine.kernels = use
            engine._drop_graphs()  # each variant captures its own graphs, in a fresh pool
            for pos in positions:
                with torch.inference_mode():
                    for _ in range(3):
                        engine._step_graph(token, pos)
                    sync()
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        engine._step_graph(token, pos)
                    sync()
                ms = (time.perf_counter() - t0) / reps * 1000
                rows.append({"attention": "triton" if use else "torch", "position": pos,
                             "span": engine._bucket(pos + 1), "ms_per_token": round(ms, 4),
                             "tokens_per_s": round(1000 / ms, 1)})
                emit(dict(path="steady", **rows[-1]))
    finally:
        engine.kernels, engine.cached = kernels, []
        engine._drop_graphs()
    return rows


def main(args):
    from utils.chat import ChatModel
    from utils.generation import build_chat_prompt
    from utils.prompts import load_template
    print("versions:", json.dumps(versions()), flush=True)
    config = llama_config(args)
    started = time.perf_counter()
    model, tokenizer = build_model(config, args)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, {args.bits}-bit, "
          f"LoRA r={args.lora_r}, {model.device}, ready in {time.perf_counter() - started:.1f} s", flush=True)
    template = load_template("chat", tokenizer)
    ctx = config.max_position_embeddings
    budget = ctx - args.max_new_tokens
    chat = ChatModel(model, tokenizer, template, budget, budget, "random")
    rng = random.Random(0)
    lengths = [int(x) for x in args.message_words.split(",")]
    messages = [" ".join(f"w{rng.randrange(3, config.vocab_size)}" for _ in range(lengths[i % len(lengths)]))
                for i in range(args.turns)]
    results = {"versions": versions(), "shape": config.to_dict(), "args": vars(args)}

    # ---- transformers' generate on the first turn's prompt ----
    ids, _ = build_chat_prompt(tokenizer, template, [], messages[0], ctx - args.max_new_tokens)
    results["generate"], reference = time_generate(model, ids, args.baseline_tokens)
    emit(dict(path="generate", prompt_tokens=len(ids), **results["generate"]))
    if args.hf_static:
        time_generate(model, ids, 8, cache_implementation="static")  # compile once, untimed
        results["generate_static"], _ = time_generate(model, ids, args.baseline_tokens,
                                                       cache_implementation="static")
        emit(dict(path="generate_static", prompt_tokens=len(ids), **results["generate_static"]))

    # ---- the project's streaming path, multi-turn ----
    history, turns = [], []
    for i, message in enumerate(messages):
        sample = i == len(messages) - 1 and len(messages) > 1
        settings = {"max_new_tokens": args.max_new_tokens, "temperature": 0.7 if sample else 0.0, "top_p": 0.9,
                    "top_k": 0, "repetition_penalty": 1.0, "seed": 0}
        sync()
        t0 = time.perf_counter()
        first, reply = None, []
        for delta in chat.stream(history, message, settings):
            first = first or time.perf_counter()
            reply.append(delta)
        sync()
        end = time.perf_counter()
        stats = getattr(getattr(model, "_static_decoder", None), "last_stats", {})
        new = stats.get("new_tokens") or len(tokenizer("".join(reply), add_special_tokens=False)["input_ids"])
        turn = {"turn": i + 1, "sampled": sample, "prompt_tokens": stats.get("prompt_tokens"),
                "reused_tokens": stats.get("reused_tokens"), "new_tokens": new, "ttft_s": round(first - t0, 4),
                "tokens_per_s": round((new - 1) / (end - first), 1)}
        turns.append(turn)
        emit(dict(path="stream", **turn))
        history.append((message, "".join(reply).strip()))
    results["stream"] = turns
    engine = getattr(model, "_static_decoder", None)
    results["decoder"] = {"cuda_graphs": getattr(engine, "use_graphs", None),
                          "triton_attention": getattr(engine, "kernels", None)}
    emit(dict(path="decoder", **results["decoder"]))
    later = turns[1:] or turns
    results["stream_summary"] = {"median_tokens_per_s_turn2+": statistics.median(t["tokens_per_s"] for t in later),
                                 "median_ttft_s_turn2+": statistics.median(t["ttft_s"] for t in later),
                                 "first_turn_ttft_s": turns[0]["ttft_s"]}

    if args.profile and torch.cuda.is_available():
        from torch.profiler import ProfilerActivity, profile

        from utils.profiling import gpu_idle
        settings = {"max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in chat.stream(history, messages[0], settings):
                pass
            sync()
        print(f"=== profile: a 64-token reply after {len(turns)} turns ===")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
        print("GPU idle:", json.dumps(gpu_idle(prof, min_gap_us=20.0)), flush=True)

    if args.steady:
        results["steady"] = steady_steps(model, [int(x) for x in args.steady.split(",")], args.steady_reps)

    # ---- greedy agreement with generate ----
    n = min(args.verify_tokens, len(reference))
    results["greedy_check"] = verify(model, tokenizer, ids, reference[:n], n)
    emit(dict(path="greedy_check", **results["greedy_check"]))

    g, s = results["generate"], results["stream_summary"]
    print(f"\n| path | tokens/s | TTFT |\n|---|---|---|\n"
          f"| model.generate (dynamic cache) | {g['tokens_per_s']:.1f} | {g['ttft_s'] * 1000:.0f} ms |", flush=True)
    if "generate_static" in results:
        gs = results["generate_static"]
        print(f"| generate(cache_implementation='static') | {gs['tokens_per_s']:.1f} | {gs['ttft_s'] * 1000:.0f} ms |")
    print(f"| project stream, turns 2-{len(turns)} (median) | {s['median_tokens_per_s_turn2+']:.1f} | "
          f"{s['median_ttft_s_turn2+'] * 1000:.0f} ms |\n| project stream, turn 1 (one-time setup) | "
          f"{turns[0]['tokens_per_s']:.1f} | {turns[0]['ttft_s'] * 1000:.0f} ms |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
