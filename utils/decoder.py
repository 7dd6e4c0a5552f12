"""Batch-1 decoding with a static KV cache: the fast path behind `utils.generation.stream_reply`.

transformers' `generate` spends most of a 7B model's decode step launching ~1,500 small kernels from Python and
growing its cache. Here the cache is allocated once per model (and kept across turns: a new prompt that starts
with the previous conversation only prefills its new tokens), and on a CUDA GPU each single-token step is a
CUDA graph: captured once per attention-length bucket (256, 512, 1024, 1536, ... tokens), then replayed, so a new prompt
length never recaptures or recompiles. RMSNorm, RoPE and SiLU * up run as fused kernels there (utils/speed.py),
and each layer's RoPE, cache write and attention as three Triton kernels that read only the cache slots in use
(utils/decode_attention.py; `LLAMA_QLORA_DECODE_KERNELS=0` keeps torch ops for them).
The step for token t+1 is queued on the GPU before token t is turned into text, so detokenizing overlaps it.

On the CPU the same code runs eagerly with exact-length attention, computing what `generate` computes (the tests
compare them token for token). Models it does not cover (not LLaMA-shaped, split over several devices, special
generation settings) go through `generate`, and `fast_decoder` says why once. `LLAMA_QLORA_FAST_DECODE=0` turns
it off; `LLAMA_QLORA_CUDA_GRAPHS=0` keeps it but without CUDA graphs.
"""

import os
import sys
import threading
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from utils import decode_attention, speed
from utils.decode_projections import Projections

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")  # decoder layers of exactly the shape _forward computes
BUCKET_MIN = 256  # shortest attention span a CUDA graph is captured for
BUCKET_STEP = 512  # beyond 1024 slots, spans grow by this much (one more graph each, captured on first use)
GPU_CACHE_MIN = 4096  # tokens of KV cache allocated at once on a GPU (capped by the context), so graphs rarely
# need recapturing for a larger cache. LLaMA-2-7B: 4096 tokens = 2 GiB in bf16.
# cuDNN attention (PyTorch's first choice on H100) builds a plan for every new (query, key) length: seconds of
# time-to-first-token on each new prompt length. Flash / memory-efficient kernels need no such step.
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# One token attending over a long cache: the memory-efficient kernel runs one block per head (32 of the H100's
# 132 SMs) and took ~0.15 ms a layer at 4096 slots; two batched matmuls spread over the whole GPU.
MATMUL_ATTENTION_FROM = 1024
# generation_config fields that transformers' generate would act on and this decoder does not implement
UNSUPPORTED_GENERATION = ("no_repeat_ngram_size", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens",
                          "forced_bos_token_id", "forced_eos_token_id", "sequence_bias", "min_new_tokens",
                          "exponential_decay_length_penalty", "min_p", "epsilon_cutoff", "eta_cutoff")


def fast_decoder(model):
    """The model's StaticDecoder, made on first use; None (with a one-time note) where it does not apply."""
    if os.environ.get("LLAMA_QLORA_FAST_DECODE", "1") == "0":
        return None
    engine = getattr(model, "_static_decoder", None)
    if engine is None:
        reason = unsupported_reason(model)
        engine = StaticDecoder(model) if reason is None else reason
        model._static_decoder = engine
        if reason is not None:
            print(f"note: fast decoding is off for this model ({reason}); using transformers' generate",
                  file=sys.stderr, flush=True)
    return engine if isinstance(engine, StaticDecoder) else None


def unsupported_reason(model):
    lm = speed.causal_lm(model)
    config = lm.config
    if config.model_type not in SUPPORTED_TYPES:
        return f"model type '{config.model_type}'"
    core = getattr(lm, "model", None)
    if core is None or not all(hasattr(core, n) for n in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "unexpected module layout"
    if "dynamic" in str(getattr(core.rotary_emb, "rope_type", "default")):
        return "dynamic RoPE scaling"
    if getattr(config, "sliding_window", None) and (config.model_type != "qwen2" or config.use_sliding_window):
        return "sliding-window attention"
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None):
        return "logit soft-capping"
    for layer in core.layers:
        attn = layer.self_attn
        if not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim")) \
                or hasattr(attn, "q_norm") or not speed.is_swiglu_mlp(layer.mlp) \
                or not (speed.is_rms_norm(layer.input_layernorm) or isinstance(layer.input_layernorm,
                                                                                speed.FusedRMSNorm)):
            return "a decoder layer of another shape"
    devices = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
    if len(devices) != 1:
        return "weights spread over several devices"
    gen = getattr(lm, "generation_config", None)
    for field in UNSUPPORTED_GENERATION:
        if getattr(gen, field, None) not in (None, 0, [], {}):
            return f"generation_config.{field} is set"
    return None


class StaticDecoder:
    """One model's KV cache, CUDA graphs and the last conversation held in the cache. One reply at a time:
    `try_acquire` before `generate`, `release` after (a second concurrent reply uses `generate` instead)."""

    def __init__(self, model):
        self.lm = speed.causal_lm(model)
        self.core = self.lm.model
        self.layers = list(self.core.layers)
        config = self.lm.config
        emb = self.core.embed_tokens.weight
        self.device, self.dtype = emb.device, emb.dtype
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.kv_heads = config.num_key_value_heads
        self.rep = config.num_attention_heads // self.kv_heads
        self.ctx = getattr(config, "max_position_embeddings", None) or 2048
        self.use_graphs = self.device.type == "cuda" and os.environ.get("LLAMA_QLORA_CUDA_GRAPHS", "1") != "0"
        self.lock = threading.Lock()
        self.capacity, self.k, self.v = 0, [], []
        self.cached = []  # token ids whose keys and values are in the cache, at positions 0..len-1
        self._drop_graphs()
        self.proj = {(i, group): self._projections(i, group)  # (layer index, group) -> Projections
                     for i in range(len(self.layers)) for group in ("qkv", "o", "gate_up", "down")}
        self.kernels = self.use_graphs and os.environ.get("LLAMA_QLORA_DECODE_KERNELS", "1") != "0" \
            and decode_attention.works(self.device, self.dtype, self.head_dim, config.num_attention_heads,
                                       self.kv_heads)
        self.last_stats = {}
        self.proven = False  # True after the first reply that produced a token

    def _projections(self, i, group):
        """Layer i's projections of `group` (utils/decode_projections.py); on the GPU path the 16-bit bases of
        q/k/v and of gate/up run as one concatenated matrix each."""
        layer = self.layers[i]
        attn, mlp = layer.self_attn, layer.mlp
        modules = {"qkv": [attn.q_proj, attn.k_proj, attn.v_proj], "o": [attn.o_proj],
                   "gate_up": [mlp.gate_proj, mlp.up_proj], "down": [mlp.down_proj]}[group]
        return Projections(modules, self.dtype, fuse_bases=self.use_graphs and group in ("qkv", "gate_up"))

    @property
    def fused(self):
        """The groups whose 16-bit base weights run as one concatenated matrix."""
        return {key: p for key, p in self.proj.items() if p.weight is not None}

    def _drop_graphs(self):
        """Forget the captured graphs (they hold the addresses of buffers that are going); a fresh memory pool."""
        self.graphs, self.pool = {}, None

    def _check_adapters(self):
        """Before a reply: if a LoRA adapter changed since its copies were made (trained further, disabled,
        merged, another one set active), remake them; the cached conversation is dropped, and the graphs too
        when a copy changed shape."""
        changed = False
        for key, p in self.proj.items():
            if p.stale():
                changed = True
                done = p.refresh()
                if done is None:
                    self.proj[key] = self._projections(*key)
                if not done:
                    self._drop_graphs()
        if changed:
            self.cached = []

    def try_acquire(self):
        return self.lock.acquire(blocking=False)

    def release(self):
        self.lock.release()

    # ---- cache ----------------------------------------------------------------------------------------

    def _ensure_capacity(self, need):
        if need <= self.capacity:
            return
        cap = max(need, 2 * self.capacity, GPU_CACHE_MIN if self.use_graphs else 256)
        cap = min(-(-cap // BUCKET_MIN) * BUCKET_MIN, self.ctx)
        shape = (1, self.kv_heads, cap, self.head_dim)
        k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        for new, old in zip(k + v, self.k + self.v):  # keep the conversation already in the cache
            new[:, :, :self.capacity] = old
        self.k, self.v, self.capacity = k, v, cap
        self._drop_graphs()
        if self.use_graphs:
            self.tok = torch.zeros((1, 1), dtype=torch.long, device=self.device)
            self.pos = torch.zeros((1,), dtype=torch.long, device=self.device)
            self.span = torch.arange(cap, device=self.device)
            self.host_tok = torch.zeros((1, 1), dtype=torch.long, pin_memory=True)
            self.ready = torch.cuda.Event()

    def _bucket(self, length):
        """The attention span captured for `length` cache slots: 256, 512, 1024, then every BUCKET_STEP. Each
        step reads every slot of its span, so doubling beyond 1024 read up to 2x the keys and values needed
        (at 2.5k tokens of context: 4096 slots, 2.1 GB a token instead of 1.3 GB on LLaMA-2-7B)."""
        b = BUCKET_MIN
        while b < min(length, 1024):
            b *= 2
        if length > b:
            b = -(-length // BUCKET_STEP) * BUCKET_STEP
        return min(b, self.capacity)

    # ---- the model, one layer at a time ---------------------------------------------------------------

    def _forward(self, tokens, positions, span, mask, write):
        """Logits (1, vocab) in fp32 for the last of `tokens` (1, n) at `positions` (1, n). Keys and values are
        stored by `write(layer_index, k, v)`; attention reads the first `span` cache slots, masked by `mask`
        (None: causal over exactly those slots). write=None: a single token at self.pos, whose RoPE, cache write
        and attention run as the Triton kernels of utils/decode_attention.py (no mask)."""
        with sdpa_kernel(ATTENTION_BACKENDS):
            return self._layers(tokens, positions, span, mask, write)

    def _layers(self, tokens, positions, span, mask, write):
        x = self.core.embed_tokens(tokens)
        cos, sin = self.core.rotary_emb(x, positions)
        norm = self.layers[0].input_layernorm
        h = speed.rms_norm(x, norm.weight, norm.variance_epsilon)
        for i, layer in enumerate(self.layers):
            scale = layer.self_attn.scaling
            q, k, v = self.proj[i, "qkv"](h)
            if write is None:
                o = decode_attention.attend(q, k, v, cos, sin, self.pos, self.k[i], self.v[i], span, scale)
            else:
                o = self._attention(i, q, k, v, cos, sin, span, mask, write, scale)
            o = self.proj[i, "o"](o)[0]
            norm = layer.post_attention_layernorm
            x, h = speed.add_rms_norm(x, o, norm.weight, norm.variance_epsilon)
            gate, up = self.proj[i, "gate_up"](h)
            o = self.proj[i, "down"](speed.silu_mul(gate, up))[0]
            norm = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.core.norm
            x, h = speed.add_rms_norm(x, o, norm.weight, norm.variance_epsilon)
        return self.lm.get_output_embeddings()(h[:, -1:]).float()[:, -1]

    def _attention(self, i, q, k, v, cos, sin, span, mask, write, scale):
        """Layer i's attention with torch ops: q, k, v (1, n, heads * head_dim) -> (1, n, heads * head_dim)."""
        n = q.shape[1]
        q, k, v = (t.view(1, n, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = speed.rope(q, k, cos, sin)
        write(i, k, v)
        keys, values = self.k[i][:, :, :span], self.v[i][:, :, :span]
        if self.rep > 1:
            keys, values = (t[:, :, None].expand(-1, -1, self.rep, -1, -1).reshape(1, -1, span, self.head_dim)
                            for t in (keys, values))
        if n == 1 and mask is not None and span >= MATMUL_ATTENTION_FROM:
            w = torch.matmul(q, keys.transpose(2, 3)) * scale + mask
            o = torch.matmul(w.softmax(-1, dtype=torch.float32).to(q.dtype), values)
        else:
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None and n > 1,
                                               scale=scale)
        return o.transpose(1, 2).reshape(1, n, -1)

    def _prefill(self, ids, start):
        """Run ids[start:] (ids[:start] are in the cache already); logits for the last one."""
        n = len(ids) - start
        tokens = torch.tensor([ids[start:]], dtype=torch.long, device=self.device)
        positions = torch.arange(start, start + n, device=self.device)[None]
        mask = None
        if start:  # new tokens see the cached conversation and, causally, each other
            allowed = torch.arange(start + n, device=self.device)[None] <= positions[0, :, None]
            mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
            mask = mask.masked_fill(~allowed, float("-inf"))[None, None]

        def write(i, k, v):
            self.k[i][:, :, start:start + n] = k
            self.v[i][:, :, start:start + n] = v

        return self._forward(tokens, positions, start + n, mask, write)

    def _step_eager(self, token, pos):
        """One token at `pos` with exact-length attention (what generate does): the CPU path."""
        tokens = token.view(1, 1)
        positions = torch.tensor([[pos]], device=self.device)

        def write(i, k, v):
            self.k[i][:, :, pos:pos + 1] = k
            self.v[i][:, :, pos:pos + 1] = v

        return self._forward(tokens, positions, pos + 1, None, write)

    def _step_static(self, span):
        """One token from the static buffers self.tok / self.pos, attending over `span` masked slots."""
        if self.kernels:  # the Triton kernels read the position from self.pos and only the slots in use
            return self._forward(self.tok, self.pos.view(1, 1), span, None, None)
        allowed = (self.span[:span] <= self.pos).view(1, 1, 1, span)
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill(~allowed, float("-inf"))

        def write(i, k, v):
            self.k[i].index_copy_(2, self.pos, k)
            self.v[i].index_copy_(2, self.pos, v)

        return self._forward(self.tok, self.pos.view(1, 1), span, mask, write)

    def _step_graph(self, token, pos):
        self.tok.copy_(token.view(1, 1))
        self.pos.fill_(pos)
        span = self._bucket(pos + 1)
        entry = self.graphs.get(span)
        if entry is None:
            entry = self.graphs[span] = self._capture(span)
        if entry is False:  # capture failed earlier: the same step, launched op by op
            return self._step_static(span)
        graph, out = entry
        graph.replay()
        return out

    def _capture(self, span):
        """Capture _step_static(span) as a CUDA graph. Warming up runs the real step (it writes the same cache
        slot the replay will), which also compiles the fused kernels before capture."""
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._step_static(span)
            torch.cuda.current_stream().wait_stream(side)
            self.pool = self.pool or torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                out = self._step_static(span)
            return graph, out
        except Exception as e:  # the same step still runs, launched op by op
            print(f"note: CUDA graph capture failed ({type(e).__name__}: {e}); decoding without graphs",
                  file=sys.stderr, flush=True)
            return False

    # ---- sampling --------------------------------------------------------------------------------------

    @staticmethod
    def _pick(logits, gen, seen):
        """The next token (1, 1) from fp32 logits (1, vocab), as generate's processors would choose it."""
        penalty = gen.get("repetition_penalty") or 1.0
        if seen is not None and penalty != 1.0:
            logits = torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)
        if not gen.get("do_sample"):
            return logits.argmax(-1, keepdim=True)
        temperature = gen.get("temperature") or 1.0
        if temperature != 1.0:
            logits = logits / temperature
        top_k = min(gen.get("top_k") or 0, logits.shape[-1])
        if top_k > 0:
            kth = torch.topk(logits, top_k)[0][..., -1, None]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        top_p = gen.get("top_p")
        if top_p is not None and top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=False)
            drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
            drop[..., -1:] = False
            logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1)

    # ---- a reply ---------------------------------------------------------------------------------------

    def generate(self, prompt_ids, gen, stop_event):
        """Yield the reply's token ids one by one (the EOS token too, if one ends it). `gen` holds the
        keyword arguments generate would get (utils.generation.generation_kwargs)."""
        n, max_new, eos = len(prompt_ids), int(gen["max_new_tokens"]), set(gen["eos_token_id"])
        if n >= self.ctx:
            raise ValueError(f"the prompt is {n} tokens long; the model's context is {self.ctx}")
        started = time.perf_counter()
        self._check_adapters()
        self._ensure_capacity(min(n + max_new, self.ctx))
        reuse = 0  # leading tokens whose keys and values are already in the cache
        while reuse < min(len(self.cached), n - 1) and self.cached[reuse] == prompt_ids[reuse]:
            reuse += 1
        tracked, self.cached = list(prompt_ids), []  # the cache is inconsistent until a clean stop
        clean, produced, first, prefilled = False, 0, None, None
        try:
            with torch.inference_mode():
                logits = self._prefill(prompt_ids, reuse)
                if self.use_graphs:
                    torch.cuda.synchronize()
                prefilled = time.perf_counter()
                seen = None
                if (gen.get("repetition_penalty") or 1.0) != 1.0:
                    seen = torch.zeros(logits.shape, dtype=torch.bool, device=self.device)
                    seen[0, torch.tensor(prompt_ids, device=self.device)] = True
                token = self._pick(logits, gen, seen)
            while True:
                clean = False
                pos = len(tracked)
                go_on = produced + 1 < max_new and pos < self.capacity
                with torch.inference_mode():
                    if self.use_graphs:
                        self.host_tok.copy_(token, non_blocking=True)
                        self.ready.record()
                    if go_on:  # queue the next step before reading this token (the GPU keeps busy)
                        logits = self._step_graph(token, pos) if self.use_graphs else self._step_eager(token, pos)
                        if seen is not None:
                            seen[0, token.view(-1)] = True
                        following = self._pick(logits, gen, seen)
                    if self.use_graphs:
                        self.ready.synchronize()
                        token_id = int(self.host_tok)
                    else:
                        token_id = int(token)
                if go_on:
                    tracked.append(token_id)
                produced += 1
                first = first or time.perf_counter()
                clean = True
                yield token_id
                if token_id in eos or not go_on or stop_event.is_set():
                    break
                token = following
        finally:
            self.cached = tracked if clean else []
            end = time.perf_counter()
            self.last_stats = {"prompt_tokens": n, "reused_tokens": reuse, "new_tokens": produced,
                               "prefill_s": (prefilled or end) - started, "ttft_s": (first or end) - started,
                               "decode_s": end - (first or end), "graphs": len(self.graphs)}
