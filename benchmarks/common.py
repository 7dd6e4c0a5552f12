"""What the benchmarks share: the LLaMA shapes, a random checkpoint built fast on the GPU, a word-level
tokenizer, Alpaca-like example lengths, and timing/memory helpers."""

import json
import math
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as `python benchmarks/x.py` from anywhere: the project's utils/ must import
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

# LLaMA-2-7B and a tiny shape for CPU smoke runs (hidden, layers, intermediate, heads, vocab, context)
SHAPES = {
    "7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32,
               vocab_size=32000, max_position_embeddings=4096),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                 vocab_size=1000, max_position_embeddings=1024),
}
EOS_ID = 2


def add_shape_args(parser):
    g = parser.add_argument_group("Model shape")
    g.add_argument("--shape", choices=sorted(SHAPES), default="7b", help="LLaMA shape (7b = LLaMA-2-7B)")
    for name in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size"):
        g.add_argument(f"--{name}", type=int, default=None, help=f"override the shape's {name}")
    return g


def llama_config(args):
    from transformers import LlamaConfig
    shape = dict(SHAPES[args.shape])
    shape.update({k: getattr(args, k) for k in shape if getattr(args, k, None) is not None})
    return LlamaConfig(**shape, num_key_value_heads=shape["num_attention_heads"], rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=EOS_ID, pad_token_id=0, tie_word_embeddings=False)


def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def word_tokenizer(vocab_size):
    """A word-level tokenizer: <unk> <s> </s> and the words w3 ... w{vocab-1}; enough for random models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": EOS_ID, **{f"w{i}": i for i in range(3, vocab_size)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation apart: "User:w5" -> User : w5
    raw.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<unk>")
    tok.model_max_length = 10**6
    return tok


def random_model(config, dtype=None, seed=0):
    """A randomly initialized LlamaForCausalLM built directly on the GPU (seconds for 7B, no CPU init).
    EOS gets a zero output row (logit 0, never the greedy pick of a random model), so replies run to
    max_new_tokens."""
    from transformers import LlamaForCausalLM
    dev = device()
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    torch.manual_seed(seed)
    with torch.device(dev):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    with torch.no_grad():
        model.lm_head.weight[EOS_ID] = 0
        # the pad row (id 0, also the word tokenizer's unknown word, so every template word) is zero after
        # init: such tokens' hidden states stay exactly 0 through a random model, and the RMSNorm backward at 0
        # (x 1/sqrt(eps) per norm) overflows bf16 over 32 layers: NaN gradients (seen on 2 H100s). Make it an
        # ordinary row.
        emb = model.get_input_embeddings().weight
        emb[0] = torch.randn(emb.shape[1], device=emb.device, generator=torch.Generator(emb.device).manual_seed(1)
                             ).to(emb.dtype) * config.initializer_range
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = EOS_ID, 0
    return model


def build_checkpoint(folder, config):
    """Save a random model + word tokenizer as a safetensors folder once (the training variants and unsloth
    load it with their own quantization)."""
    stamp = os.path.join(folder, "bench_config.json")
    want = config.to_json_string()
    if os.path.isfile(stamp) and open(stamp).read() == want:
        return folder
    started = time.time()
    model = random_model(config)
    model.save_pretrained(folder)
    word_tokenizer(config.vocab_size).save_pretrained(folder)
    with open(stamp, "w") as f:
        f.write(want)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(f"built random checkpoint {folder} in {time.time() - started:.0f} s", flush=True)
    return folder


def default_workdir():
    """Local disk of the machine: /dev/shm when it has room for a 7B bf16 checkpoint, else /tmp."""
    try:
        st = os.statvfs("/dev/shm")
        if st.f_bavail * st.f_frsize > 40 * 2**30:
            return "/dev/shm/llama-qlora-bench"
    except OSError:
        pass
    return os.path.join("/tmp", "llama-qlora-bench")


def alpaca_like_lengths(n, seed=0, cutoff=512):
    """(prompt tokens, answer tokens) for n synthetic instruction examples with Alpaca-like lengths: a
    ~35-token template, an instruction (lognormal, median 15), an input in 40% of them (lognormal, median 25),
    an answer (lognormal, median 60, sigma 0.9) plus EOS; cut at `cutoff` tokens in total."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = 35 + round(rng.lognormvariate(math.log(15), 0.5))
        if rng.random() < 0.4:
            prompt += round(rng.lognormvariate(math.log(25), 0.9))
        answer = max(1, round(rng.lognormvariate(math.log(60), 0.9))) + 1
        prompt = min(prompt, cutoff - 1)
        out.append((prompt, min(answer, cutoff - prompt)))
    return out


def length_stats(lengths):
    total = sorted(p + a for p, a in lengths)
    return {"examples": len(total), "mean": round(sum(total) / len(total), 1), "p50": total[len(total) // 2],
            "p90": total[int(len(total) * 0.9)], "max": total[-1],
            "answer_share": round(sum(a for _, a in lengths) / sum(total), 3)}


def random_examples(lengths, vocab_size, seed=0):
    """Token-id examples in the project's format: labels -100 on the prompt, the answer's ids after it."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for prompt, answer in lengths:
        ids = torch.randint(3, vocab_size, (prompt + answer,), generator=g).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * prompt + ids[prompt:]})
    return out


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak():
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gib():
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def versions():
    import importlib.metadata as md
    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "triton", "unsloth"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        out["device"] = torch.cuda.get_device_name()
    return out


def emit(record):
    """One result line a parent process (or a reader of the log) picks up."""
    print("RESULT " + json.dumps(record), flush=True)


# ---------------------------------------------------------------------------------------------------------
# Diagnostics for --profile (CUDA only): where a step waits, where the GPU idles, what is alive at the peak
# ---------------------------------------------------------------------------------------------------------

_NOT_MINE = ("/torch/", "/warnings.py", "common.py", "profiling.py")  # frames left out of `where` reports


def _where(frames):
    from utils.profiling import where
    return where(frames, skip=_NOT_MINE)


def host_waits(fn):
    """Run fn() under torch.cuda's sync debug mode; {where: count} of each operation that made the CPU wait for
    the GPU (.item(), nonzero, blocking copies, ...), `where` being the calling Python frames."""
    import traceback
    import warnings
    found = {}

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" in str(message):
            where = _where([(f.filename, f.lineno, f.name) for f in reversed(traceback.extract_stack()[:-1])])
            found[where] = found.get(where, 0) + 1

    saved = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = saved
    return found


def memory_at_peak(fn, top=12):
    """Run fn() recording the CUDA caching allocator's history; the peak of allocated memory during it and the
    largest blocks alive at that moment, by the Python frames that allocated them (utils/profiling.py)."""
    from utils.profiling import PeakMemory
    recorder = PeakMemory(skip=_NOT_MINE).start()
    try:
        fn()
    finally:
        report = recorder.stop(top)
    return report
