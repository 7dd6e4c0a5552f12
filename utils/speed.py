"""Training speed-ups, on by default in finetune.py (`--speedups`; figures in BENCHMARKS.md).

What each one removes from the plain transformers + peft + bitsandbytes recipe:

- `prepare_model`: peft's `prepare_model_for_kbit_training` keeps fp32 copies of the norms, embeddings and
  lm_head, which makes the whole residual stream fp32 (twice the bytes in every elementwise op). Here the base is
  only frozen and stays in its compute dtype (bf16). fp16 GPUs keep peft's recipe: fp16 norms are not stable.
- `lora_config`: each LoRA layer's forward is one autograd function, `x W^T + s (x A^T) B^T`, with the NF4 weight
  dequantized once per pass and the adapter added inside the matmul (addmm). peft's layer also clones the output,
  casts the input to fp32 and back, and applies dropout. Used when LoRA dropout is 0 (the default), else peft's.
- `fuse_modules`: RMSNorm and SiLU(gate) * up as single kernels (torch.compile on a CUDA GPU; the same functions
  run eagerly on the CPU, so CPU tests run this code path too).
- `FusedCausalLMLoss`: cross entropy straight from the last hidden states, in chunks of tokens, only at positions
  that have a label, with the gradient computed in the same pass: the (tokens x vocab) fp32 logits are never
  held in full, and prompt tokens cost no lm_head work.
- `fuse_decoder_layers` (utils/fused_layer.py): each LLaMA decoder layer as one compiled function of plain tensors,
  with its checkpointed input parked in CPU memory: most of the CPU launch overhead and ~1 GiB of a 7B step go.
- `packed_collate`: a micro-batch's examples in one row, with position ids restarting at 0 for each one and no
  padding. transformers builds a block-diagonal causal mask from such position ids (sdpa, eager and flash
  attention), so no example attends to another; the loss equals the padded batch's (tests/test_speed.py). On
  a GPU the fused layers skip that mask and run flash attention within each example, from the segment starts
  the collator adds (tests/test_speed_gpu.py).
"""

import contextlib
import importlib.util
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

from utils.prompts import IGNORE_INDEX

# ---------------------------------------------------------------------------------------------------------
# Fused elementwise kernels: torch.compile on CUDA, the same function eagerly elsewhere
# ---------------------------------------------------------------------------------------------------------

_said = set()


def _say_once(msg):
    if msg not in _said:
        _said.add(msg)
        print(msg, file=sys.stderr, flush=True)


def compile_available():
    """torch.compile (Inductor + Triton) needs a CUDA GPU of compute capability >= 7.0 and Triton."""
    if os.environ.get("LLAMA_QLORA_COMPILE", "1") == "0" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability() >= (7, 0) and importlib.util.find_spec("triton") is not None


RECOMPILE_LIMIT = 32


def raise_recompile_limit(limit=RECOMPILE_LIMIT):
    """Let torch.compile keep up to `limit` compiled versions of a function (torch's default is 8). Beyond the
    limit it runs the function eagerly for the rest of the process, silently slow. A decoder layer reaches 8
    in an ordinary run: each grad mode (the checkpointed forward without gradients, its recomputation with
    them) compiles once per shape, then again each time another size starts to vary (packed rows: the token
    count, then the number of examples), and a padded or equal-length batch brings its own versions."""
    import torch._dynamo.config as dynamo_config
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    if getattr(dynamo_config, name, limit) < limit:
        setattr(dynamo_config, name, limit)


class _Fused:
    """Calls `fn` compiled for CUDA inputs when compile_available(), else eagerly. dynamic=True: one
    dynamic-shape compile; None: torch.compile's default (static first, dynamic after a shape changes).
    `functorch_config`: settings of torch._functorch.config in force whenever it compiles; `inductor_options`:
    Inductor settings for this function only (names this torch lacks are left out of both). If compiling fails,
    says why once and stays eager; errors after a successful first call are not caught."""

    def __init__(self, fn, dynamic=True, functorch_config=None, inductor_options=None):
        self.fn, self.dynamic, self.compiled, self.ok = fn, dynamic, None, None
        self.functorch_config = functorch_config or {}
        self.inductor_options = inductor_options or {}

    def compile(self, backend="inductor"):
        """`fn` through torch.compile with this object's settings (the tests use a backend the CPU can run)."""
        raise_recompile_limit()
        options = None
        if backend == "inductor" and self.inductor_options:
            import torch._inductor.config as inductor_config
            options = {k: v for k, v in self.inductor_options.items() if hasattr(inductor_config, k)} or None
        compiled = torch.compile(self.fn, dynamic=self.dynamic, backend=backend, options=options)
        import torch._functorch.config as functorch_config
        settings = {k: v for k, v in self.functorch_config.items() if hasattr(functorch_config, k)}
        if not settings:
            return compiled

        def run(*args):  # recompilation happens inside a call, so every call carries the settings
            with functorch_config.patch(**settings):
                return compiled(*args)
        return run

    def __call__(self, *args):
        if not args[0].is_cuda or self.ok is False:
            return self.fn(*args)
        if self.ok is None:
            if not compile_available():
                self.ok = False
                return self.fn(*args)
            try:
                self.compiled = self.compile()
                out = self.compiled(*args)
            except Exception as e:  # a compiler problem: the eager function computes the same thing
                self.ok = False
                _say_once(f"note: torch.compile of {self.fn.__name__} failed ({type(e).__name__}: {e}); "
                          "running it eagerly")
                return self.fn(*args)
            self.ok = True
            return out
        return self.compiled(*args)


def _rms_norm(x, weight, eps):
    # exactly LlamaRMSNorm: normalize in fp32, round to the input dtype, then scale
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def _add_rms_norm(x, delta, weight, eps):
    s = x + delta
    return s, _rms_norm(s, weight, eps)


def _silu_mul(gate, up):
    return F.silu(gate) * up


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(q, k, cos, sin):
    # exactly transformers' apply_rotary_pos_emb with unsqueeze_dim=1: q, k (batch, heads, seq, head_dim)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


rms_norm = _Fused(_rms_norm)
add_rms_norm = _Fused(_add_rms_norm)
silu_mul = _Fused(_silu_mul)
rope = _Fused(_rope)


# ---------------------------------------------------------------------------------------------------------
# Model preparation and module fusion
# ---------------------------------------------------------------------------------------------------------

def causal_lm(model):
    """The transformers *ForCausalLM inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def prepare_model(model):
    """Freeze the base in its compute dtype (see the module docstring). Returns the model."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def fast_path_dtype_ok():
    """The fused recipe keeps the base in its compute dtype: fine in bf16 and fp32, not in fp16."""
    from utils.modeling import compute_dtype
    return compute_dtype() != torch.float16


def is_rms_norm(module):
    # LlamaRMSNorm and its copies (Mistral, Qwen2, ...) keep `variance_epsilon`; Gemma's (1 + w) variant does not
    return hasattr(module, "variance_epsilon") and isinstance(getattr(module, "weight", None), torch.Tensor) \
        and module.weight.dim() == 1 and type(module).__name__.endswith("RMSNorm")


def is_swiglu_mlp(module):
    return all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")) \
        and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")


class FusedRMSNorm(nn.Module):
    """Same weight and epsilon as the RMSNorm it replaces; one kernel forward, one backward on CUDA."""

    def __init__(self, norm):
        super().__init__()
        self.weight, self.variance_epsilon = norm.weight, norm.variance_epsilon

    def forward(self, x):
        return rms_norm(x, self.weight, self.variance_epsilon)


class FusedSwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with SiLU and the product in one kernel; the same child modules (and so
    the same state-dict names) as the MLP it replaces."""

    def __init__(self, mlp):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def forward(self, x):
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def fuse_modules(model):
    """Replace RMSNorm and SwiGLU MLP modules of `model` by their fused versions, each after a check on random
    input that the fused function computes what the module's own does. Returns (norms, mlps) replaced."""
    counts = {"norm": 0, "mlp": 0}
    emb = model.get_input_embeddings().weight
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if is_rms_norm(child) and _same_norm(child, emb.dtype, emb.device):
                setattr(parent, name, FusedRMSNorm(child))
                counts["norm"] += 1
            elif is_swiglu_mlp(child) and _same_activation(child, emb.dtype, emb.device):
                setattr(parent, name, FusedSwiGLU(child))
                counts["mlp"] += 1
    return counts["norm"], counts["mlp"]


def _random(shape, dtype, device):
    return torch.randn(shape, generator=torch.Generator(device).manual_seed(0), device=device).to(dtype)


def _close(a, b, dtype):
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)


def _same_norm(norm, dtype, device):
    x = _random((2, 3, norm.weight.shape[0]), dtype, device)
    with torch.no_grad():
        return _close(norm(x), rms_norm(x, norm.weight, norm.variance_epsilon), dtype)


def _same_activation(mlp, dtype, device):
    # only act_fn(gate) * up changes; the projections are not run (bitsandbytes repacks 4-bit weights for its
    # CPU kernels when they see an input without gradient in eval mode, and that would change later numerics)
    gate, up = _random((2, 3, 64), dtype, device), _random((2, 3, 64), dtype, device) * 0.5
    with torch.no_grad():
        return _close(mlp.act_fn(gate) * up, silu_mul(gate, up), dtype)


# ---------------------------------------------------------------------------------------------------------
# Fused LoRA linear layers
# ---------------------------------------------------------------------------------------------------------

def _dense_weight(base, dtype):
    """The base layer's weight as a dense (out, in) matrix in `dtype`; NF4 weights are dequantized."""
    w = base.weight
    if getattr(w, "quant_state", None) is not None:
        import bitsandbytes.functional as bnbF
        w = bnbF.dequantize_4bit(w.data, w.quant_state)
    return w if w.dtype == dtype else w.to(dtype)


class _LoraLinear(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T; saves x, x A^T (tokens x r) and the adapter matrices, never W."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, base, scale):
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, shape[-1])
        bias = base.bias.to(dtype) if base.bias is not None else None
        out = F.linear(x2, _dense_weight(base, dtype), bias)
        xa = x2 @ lora_a.to(dtype).t()
        out.addmm_(xa, lora_b.to(dtype).t(), alpha=scale)
        ctx.save_for_backward(x, xa, lora_a, lora_b)
        ctx.base, ctx.scale = base, scale
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, xa, lora_a, lora_b = ctx.saved_tensors
        dtype = x.dtype
        g = grad.reshape(-1, grad.shape[-1]).to(dtype)
        x2 = x.reshape(-1, x.shape[-1])
        gb = g @ lora_b.to(dtype)  # (tokens, r)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = g @ _dense_weight(ctx.base, dtype)
            dx.addmm_(gb, lora_a.to(dtype), alpha=ctx.scale)
            dx = dx.view(x.shape)
        da = (gb.t() @ x2).mul_(ctx.scale).to(lora_a.dtype)
        db = (g.t() @ xa).mul_(ctx.scale).to(lora_b.dtype)
        return dx, da, db, None, None


class _FusedLoraMixin:
    """forward() through _LoraLinear when it computes what peft's forward would: one active plain LoRA adapter,
    not merged, no dropout in training. Anything else goes to peft's own forward."""

    def _fused_adapter(self, args, kwargs):
        if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1 \
                or getattr(self, "fan_in_fan_out", False):
            return None
        name = self.active_adapters[0]
        if name not in self.lora_A or name in getattr(self, "lora_variant", {}) or self.use_dora.get(name):
            return None
        if self.training and not isinstance(self.lora_dropout[name], nn.Identity):
            return None
        if getattr(getattr(self.get_base_layer().weight, "quant_state", None), "packing_format_for_cpu", False):
            return None  # bitsandbytes' CPU inference layout: only its own forward reads it
        return name

    def forward(self, x, *args, **kwargs):
        name = self._fused_adapter(args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        return _LoraLinear.apply(x, self.lora_A[name].weight, self.lora_B[name].weight, self.get_base_layer(),
                                 self.scaling[name])


def _fused_lora_classes(bits):
    """{base layer type: fused LoRA layer class} for peft's custom-module dispatch."""
    if bits == 16:
        from peft.tuners.lora.layer import Linear
        return {nn.Linear: type("FusedLoraLinear", (_FusedLoraMixin, Linear), {})}
    if bits == 4 and importlib.util.find_spec("bitsandbytes") is not None:
        import bitsandbytes as bnb
        from peft.tuners.lora.bnb import Linear4bit
        return {bnb.nn.Linear4bit: type("FusedLoraLinear4bit", (_FusedLoraMixin, Linear4bit), {})}
    return {}  # 8-bit: peft's layers


def lora_config(bits, fused=True, **kwargs):
    """A peft LoraConfig; with `fused`, LoRA layers on 4-bit and 16-bit bases use the fused forward. The
    adapter files are the same either way (same classes' parameters and names)."""
    from peft import LoraConfig
    config = LoraConfig(**kwargs)
    classes = _fused_lora_classes(bits) if fused else {}
    if classes:
        config._register_custom_module(classes)  # peft's documented (experimental) custom-layer hook
    return config


# ---------------------------------------------------------------------------------------------------------
# Loss from hidden states
# ---------------------------------------------------------------------------------------------------------

class _LinearCrossEntropy(torch.autograd.Function):
    """sum over kept rows of cross_entropy(h W^T, t) / divisor, in chunks of rows. The gradient with respect to h
    is computed chunk by chunk in the forward pass (W is frozen), so only one chunk's logits exist at a time.
    Rows whose target is -100 are computed and then masked out rather than selected out: selecting would need
    their count on the CPU, a GPU->CPU wait in the middle of every step (the lm_head matmul of those rows
    costs well under 1% of a step)."""

    @staticmethod
    def forward(ctx, h, weight, targets, divisor, chunk):
        w = weight if weight.dtype == h.dtype else weight.to(h.dtype)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        for s in range(0, h.shape[0], chunk):
            logits = (h[s:s + chunk] @ w.t()).float()  # as transformers: logits in h's dtype, loss in fp32
            t = targets[s:s + chunk, None]
            keep = t != IGNORE_INDEX
            t = t.clamp_min(0)
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            # where(), not a product with 0: an ignored row may hold inf / NaN (a padded position), dropped here
            total += torch.where(keep, lse - logits.gather(1, t), 0.0).sum()
            if grad is not None:
                p = logits.sub_(lse).exp_()  # softmax, in place of the logits
                p.scatter_add_(1, t, torch.full_like(t, -1, dtype=p.dtype))
                grad[s:s + chunk] = torch.where(keep, p.div_(divisor), 0.0).to(h.dtype) @ w
        ctx.save_for_backward(grad)
        return total / divisor

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None, None


def linear_cross_entropy(hidden, weight, labels, num_items_in_batch=None, chunk_tokens=None):
    """The causal-LM loss of transformers (labels shifted left by one, -100 ignored, sum / num_items_in_batch
    when given, else the mean) computed from `hidden` (batch, seq, dim) and the output embedding `weight`.
    No GPU->CPU synchronization: a batch without any label gives 0 (not transformers' 0 / 0)."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    t = labels[:, 1:].reshape(-1).to(hidden.device, non_blocking=True)
    divisor = (t != IGNORE_INDEX).sum() if num_items_in_batch is None else num_items_in_batch
    if torch.is_tensor(divisor):
        divisor = divisor.to(device=hidden.device, dtype=torch.float32, non_blocking=True).clamp_min(1)
    else:
        divisor = max(1, divisor)
    chunk = chunk_tokens or max(256, (1 << 25) // weight.shape[0])  # ~128 MiB of fp32 logits per chunk
    return _LinearCrossEntropy.apply(h, weight, t, divisor, chunk)


def fused_loss_problem(model):
    """None if FusedCausalLMLoss computes this model's loss exactly, else why not."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    norm = getattr(lm.get_decoder(), "norm", None) if hasattr(lm, "get_decoder") else None
    if norm is None:
        return "no final norm to read the hidden states from"
    if type(head) is not nn.Linear or head.bias is not None:
        return "the output layer is not a plain bias-free Linear (an adapter on lm_head?)"
    if head.weight.requires_grad:
        return "the output layer is trained"
    if getattr(lm.config, "final_logit_softcapping", None) or getattr(lm.config, "logit_scale", None):
        return "the model scales or caps its logits"
    return None


class _TieToOutputs(torch.autograd.Function):
    """loss itself; in the backward pass a zero gradient for `outputs` as well. Under FSDP the root unit's
    backward hooks sit on the model's outputs (the logits), which the chunked loss does not read: without a
    gradient there, FSDP would not finish its backward pass (no final callback, no gradient reduction wait)."""

    @staticmethod
    def forward(ctx, loss, outputs):
        ctx.shape, ctx.dtype, ctx.device = outputs.shape, outputs.dtype, outputs.device
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.zeros(ctx.shape, dtype=ctx.dtype, device=ctx.device)


class FusedCausalLMLoss:
    """A `compute_loss_func` for the HF Trainer (and the benchmark's loop): loss(outputs, labels,
    num_items_in_batch). It reads the last hidden states from a forward hook on the final norm, so the
    model's own head needs to run on one position only: pass `logits_to_keep=1` (packed_collate does).

    in_output_layer=True (FSDP, the output layer a unit of its own: see ends_as_fsdp_units): the output layer's
    weight is whole only while that layer runs, so the loss is computed there, by a forward hook, from the labels
    given to `expect` before the forward pass (utils.training.Trainer does). The backward pass needs no weight:
    _LinearCrossEntropy has the hidden states' gradient ready from the forward pass."""

    def __init__(self, model, chunk_tokens=None, tie_to_outputs=False, in_output_layer=False):
        lm = causal_lm(model)
        self.head, self.chunk_tokens, self.hidden = lm.get_output_embeddings(), chunk_tokens, None
        self.tie_to_outputs = tie_to_outputs  # FSDP: see _TieToOutputs
        self.in_output_layer, self._expected, self._loss = in_output_layer, None, None
        self._hooks = [lm.get_decoder().norm.register_forward_hook(self._keep)]
        if in_output_layer:
            self._hooks.append(self.head.register_forward_hook(self._loss_in_output_layer))

    def _keep(self, module, args, output):
        self.hidden = output

    def expect(self, labels, num_items_in_batch=None):
        """The labels (and the Trainer's token count) of the next forward pass; kept with in_output_layer only."""
        if self.in_output_layer:
            self._expected = (labels, num_items_in_batch)

    def _loss_in_output_layer(self, module, args, output):
        if self._expected is None:  # a forward pass without labels (generation, a check): no loss
            return
        (labels, num_items), self._expected = self._expected, None
        self._loss = self._compute(module.weight, labels, num_items)

    def _compute(self, weight, labels, num_items_in_batch):
        hidden, self.hidden = self.hidden, None
        if hidden is None:
            raise RuntimeError("FusedCausalLMLoss: the model's final norm did not run before the loss")
        return linear_cross_entropy(hidden, weight, labels, num_items_in_batch, self.chunk_tokens)

    def __call__(self, outputs, labels, num_items_in_batch=None):
        if self.in_output_layer:
            loss, self._loss = self._loss, None
            if loss is None:
                raise RuntimeError("FusedCausalLMLoss: no loss from the output layer (expect() was not called "
                                   "with the labels before the forward pass)")
        else:
            loss = self._compute(self.head.weight, labels, num_items_in_batch)
        logits = getattr(outputs, "logits", None)
        if self.tie_to_outputs and torch.is_tensor(logits) and logits.requires_grad:
            loss = _TieToOutputs.apply(loss, logits)
        return loss

    def remove(self):
        for hook in self._hooks:
            hook.remove()


class InputEmbedding(nn.Embedding):
    """The model's input embedding, marked as an FSDP unit of its own (ends_as_fsdp_units)."""


class OutputLayer(nn.Linear):
    """The model's output layer, marked as an FSDP unit of its own (ends_as_fsdp_units)."""


def ends_as_fsdp_units(model):
    """Under FSDP1 the root unit holds whatever no wrapped block claims: for LLaMA the input embedding and the
    output layer (2 x 250 MiB at the 7B shape). FSDP gathers the root whole at the start of each step and frees
    it only after the backward pass, so both stayed whole on every GPU all step long (the largest block alive at
    the FSDP peak on 2 H200s). Here they get classes of their own, which the wrap policy can name
    (fsdp_wrap_classes): each becomes a unit, whole only while it runs. Returns True if done; False leaves the
    model as it is, where the two share one weight (tied embeddings: one unit must hold it) or are not the
    plain layers."""
    lm = causal_lm(model)
    embed, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    if type(embed) is not nn.Embedding or type(head) is not nn.Linear or head.weight is embed.weight:
        return False
    embed.__class__, head.__class__ = InputEmbedding, OutputLayer
    return True


def fsdp_wrap_classes(model, environ=os.environ):
    """The class names for peft's FSDP wrap policy (it reads FSDP_TRANSFORMER_CLS_TO_WRAP, which transformers
    hands to accelerate): those already set there, else the model's own blocks (its _no_split_modules, as peft
    defaults to), plus InputEmbedding / OutputLayer where the model has them."""
    given = [c for c in environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c]
    present = {type(m).__name__ for m in model.modules()}
    blocks = given or sorted({c for m in model.modules() for c in (getattr(m, "_no_split_modules", None) or [])
                              if c in present})
    return blocks + [c for c in (InputEmbedding.__name__, OutputLayer.__name__) if c in present and c not in blocks]


# ---------------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------------

def packed_collate(row_tokens=None, logits_to_keep=None):
    """Examples without padding between them: each row holds whole examples back to back, with position ids
    restarting at 0 for each one. transformers turns such position ids into a block-diagonal causal mask, so
    no example sees another (there is no attention_mask, and use_cache=False, since transformers reads packed
    position ids only then). Each example's first label is -100, so none is trained to predict the start of
    the next (its first token is a prompt token anyway unless --train_on_inputs).

    row_tokens=None puts the whole micro-batch in one row (1, total tokens): the same examples per step as
    padding, none of the padding. With row_tokens, examples fill rows of at most that many tokens in order
    (one that is longer gets a row of its own); shorter rows end in a filler segment of its own (position ids
    from 0, no labels). Equal-length examples of row_tokens each make one row with no reset at all, which
    keeps plain causal attention (sdpa's causal kernels) and passes no position ids (0, 1, ... as transformers
    makes them without).

    Where a row holds several segments, the batch also says where each segment starts among all the rows'
    tokens (`cu_seq_lens_q` / `_k`, int32, and `max_length_q` / `_k`, the longest segment: the names
    transformers' flash-attention path reads). On a GPU the fused decoder layers then run flash attention
    within each segment (utils/fused_layer.py), so a row's attention costs the sum of its
    segments' squared lengths rather than its own squared length; elsewhere the mask is used."""

    def collate(batch):
        rows, row = [], []
        for ex in batch:
            if row and row_tokens and sum(len(e["input_ids"]) for e in row) + len(ex["input_ids"]) > row_tokens:
                rows.append(row)
                row = []
            row.append(ex)
        rows.append(row)
        width = max(sum(len(e["input_ids"]) for e in r) for r in rows)
        ids, labels, positions, lengths = [], [], [], []
        for r in rows:
            i, lab, pos = [], [], []
            for ex in r:
                i += ex["input_ids"]
                lab += [IGNORE_INDEX] + list(ex["labels"][1:])
                pos += range(len(ex["input_ids"]))
                lengths.append(len(ex["input_ids"]))
            fill = width - len(i)
            ids.append(i + [0] * fill)
            labels.append(lab + [IGNORE_INDEX] * fill)
            positions.append(pos + list(range(fill)))
            if fill:
                lengths.append(fill)
        out = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "use_cache": False}
        if len(lengths) > len(rows):  # some row holds several segments: where they start, for attention by segment
            out["position_ids"] = torch.tensor(positions)
            starts = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
            out.update(cu_seq_lens_q=starts, cu_seq_lens_k=starts, max_length_q=max(lengths),
                       max_length_k=max(lengths))
        if logits_to_keep:
            out["logits_to_keep"] = logits_to_keep
        return out

    return collate


def with_logits_to_keep(collate, logits_to_keep=1):
    def wrapped(batch):
        return dict(collate(batch), logits_to_keep=logits_to_keep)
    return wrapped


# ---------------------------------------------------------------------------------------------------------
# All of it, for finetune.py and the benchmark
# ---------------------------------------------------------------------------------------------------------

def _park(t):
    """Saved-tensor pack hook: activations of 1 MiB or more (never parameters or other leaves) go to pinned CPU
    memory on a side stream (utils.fused_layer.offload)."""
    from utils.fused_layer import offload
    if t.is_cuda and t.grad_fn is not None and t.numel() * t.element_size() >= 1 << 20:
        return offload.park(t), t.device
    return t


def _fetch(packed):
    from utils.fused_layer import offload
    return offload.fetch(*packed) if isinstance(packed, tuple) else packed


class TrainingSpeedups:
    """What `enable` switched on, with the collator and Trainer loss function that go with it."""

    def __init__(self, model, packing=True, park_inputs=True, fsdp=False, keep_dequantized="auto"):
        """keep_dequantized: whether the fused layers keep their dequantized 4-bit weights for the backward pass
        in training without checkpointing (fused_layer.WeightKeeping: auto, on, off). fsdp=True: the part that
        works with FSDP1 sharding: packing, the fused RMSNorm and SwiGLU modules (they keep their weights as
        module parameters, which FSDP flattens and hands back as views while a unit runs),
        the chunked loss (in the output layer's own unit where possible), checkpointed layer inputs parked in CPU
        memory through saved-tensor hooks. The fused decoder layers and LoRA projections are left out: they
        read the base weights and the adapters directly rather than through the modules FSDP wraps."""
        from utils.fused_layer import FastDecoderLayer, WeightKeeping, attention_mask_hook, fuse_decoder_layers
        causal_lm(model).config.use_cache = False  # training never reads a KV cache; the fused layers need none
        self.fsdp = fsdp
        self.norms, self.mlps = fuse_modules(model)
        self.layers = 0 if fsdp else fuse_decoder_layers(model, park_inputs=park_inputs)
        self.weight_keeping = WeightKeeping([m for m in model.modules() if isinstance(m, FastDecoderLayer)],
                                            keep_dequantized) if self.layers else None
        # the decoder stack gets its attention masks from the batch, not by reading position ids back from the
        # GPU (fused_layer.attention_mask_hook); only where every layer is fused, each computing full causal
        # attention (a layer left as it was might want another mask, a sliding window's say)
        stack = getattr(causal_lm(model), "model", None)
        layers = getattr(stack, "layers", None)
        self.mask_hook = stack.register_forward_pre_hook(attention_mask_hook, with_kwargs=True) \
            if self.layers and isinstance(layers, nn.ModuleList) \
            and all(isinstance(layer, FastDecoderLayer) for layer in layers) else None
        self.park_inputs = park_inputs and torch.cuda.is_available()
        problem = fused_loss_problem(model)
        # under FSDP, with the chunked loss, the input and output layers become units of their own (the loss is
        # then computed inside the output layer's unit); finetune.py hands fsdp_wrap to peft's wrap policy
        self.own_end_units = fsdp and problem is None and ends_as_fsdp_units(model)
        self.fsdp_wrap = fsdp_wrap_classes(model) if self.own_end_units else None
        self.loss_func = FusedCausalLMLoss(model, tie_to_outputs=fsdp, in_output_layer=self.own_end_units) \
            if problem is None else None
        self.loss_note = "chunked cross entropy on labelled positions" if problem is None \
            else f"plain loss ({problem})"
        self.packing = packing
        self.fused_lora = sum(isinstance(m, _FusedLoraMixin) for m in model.modules())
        # cuDNN attention (PyTorch's first choice on H100) builds a new plan for every new sequence length,
        # which packed and padded batches bring at nearly every step; flash / memory-efficient kernels don't.
        # The fused layers still pick it for unpacked rows while their shapes repeat (fused_layer.CUDNN_SHAPES)
        self.cudnn_attention_off = torch.cuda.is_available() and torch.backends.cuda.cudnn_sdp_enabled()
        if self.cudnn_attention_off:
            torch.backends.cuda.enable_cudnn_sdp(False)

    def saved_tensors(self):
        """The context the Trainer runs each forward pass and loss in. Under FSDP with a GPU: the checkpointed
        layers' inputs (what non-reentrant checkpointing saves for the backward pass, ~16 MiB a layer at 2k
        tokens x 4096) wait in pinned CPU memory, as the fused layers' inputs do on one GPU."""
        if not (self.fsdp and self.park_inputs):
            return contextlib.nullcontext()
        return torch.autograd.graph.saved_tensors_hooks(_park, _fetch)

    def collator(self, tokenizer):
        from utils.data import pad_collate
        keep = 1 if self.loss_func is not None else None
        if self.packing:
            return packed_collate(logits_to_keep=keep)
        collate = pad_collate(tokenizer)
        return with_logits_to_keep(collate) if keep else collate

    def describe(self):
        kernels = "compiled" if compile_available() else "eager (no CUDA compile here)"
        layers = f"{self.layers} decoder layers as one fused function each ({kernels}"
        layers += ", checkpointed inputs parked in CPU memory)" if self.park_inputs else ")"
        if self.fsdp:
            return (f"speed-ups under FSDP: fused RMSNorm x{self.norms} and SwiGLU x{self.mlps} ({kernels}), "
                    f"{self.loss_note}, "
                    f"{'packed micro-batches (no padding)' if self.packing else 'padded micro-batches'}"
                    f"{', checkpointed layer inputs parked in CPU memory' if self.park_inputs else ''}"
                    f"{', the input and output layers in FSDP units of their own' if self.own_end_units else ''}"
                    "; the fused decoder layers and LoRA projections are off (they read weights that FSDP "
                    "flattens and shards)")
        from utils.fused_layer import cudnn_causal_on, flash_by_segment_on
        by_example = ", flash attention within each example" if self.layers and torch.cuda.is_available() \
            and flash_by_segment_on(torch.cuda.current_device()) else ""
        cudnn = " (but in the fused layers for unpacked rows of repeating shapes)" if self.layers \
            and self.cudnn_attention_off and cudnn_causal_on(torch.cuda.current_device()) else ""
        return (f"speed-ups: fused LoRA forward in {self.fused_lora} layers, fused RMSNorm x{self.norms} and "
                f"SwiGLU x{self.mlps} ({kernels}), {layers}, {self.loss_note}, "
                f"{f'packed micro-batches (no padding{by_example})' if self.packing else 'padded micro-batches'}"
                f"{', cuDNN attention off' if self.cudnn_attention_off else ''}"
                f"{cudnn}{f', {self.weight_keeping.describe()}' if self.weight_keeping else ''}")
