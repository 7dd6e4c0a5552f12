"""One compiled function per LLaMA decoder layer, for training (part of `--speedups`, figures in BENCHMARKS.md).

The fused LoRA layers of utils/speed.py already do the arithmetic of a LoRA step with few kernels, but each
projection still goes through peft's module, its hooks and a Python autograd function, and a 7B step launches
~6,000 kernels that way: the GPU waited for the CPU for a third of the step. Here the whole decoder layer
(norms, the seven LoRA projections over their NF4 or dense weights, RoPE, attention, SwiGLU, residuals) is one
function of plain tensors, compiled once by torch.compile on CUDA and shared by every layer; elsewhere it runs
eagerly, so CPU tests run the same code.

- The projections are autograd functions: y = x W^T + b + s (x A^T) B^T. They save x and x A^T, never the
  dequantized W, and dequantize again in the backward pass (on CUDA one Triton kernel, utils/nf4_kernel.py,
  elsewhere bitsandbytes' own ops or the same arithmetic in torch ops: bit for bit what bitsandbytes reads).
  The adapter's term is computed first and the base GEMM adds onto it in place. Projections of one input
  (q/k/v, gate/up) whose adapters are all there share one A GEMM (_LoraProjections).
- With gradient checkpointing, a layer keeps only its input and its middle residual (after attention) for the
  backward pass, and on a CUDA GPU these wait in pinned CPU memory (copied on a side stream), so checkpointing
  holds ~0 GPU memory per layer. The backward pass copies them back and recomputes only what the gradients
  read: not o_proj's and down_proj's outputs, so their base GEMMs are skipped (decoder_layer_gradients). It
  returns the adapter gradients as ordinary autograd outputs (no nested .backward(), so DDP's gradient hooks
  see them as usual).
- Packed rows (utils/speed.py: packed_collate) bring where each example starts; on a GPU attention then runs
  within each example through flash attention over those starts (segments()), not over whole rows with
  transformers' block-diagonal mask, which stays the path elsewhere.
- Under utils/speed.py's TrainingSpeedups the decoder stack takes its attention mask from what the batch says
  (attention_mask_hook), so transformers' mask code does not stop the CPU at every forward pass to read the
  position ids back from the GPU. Unpacked rows of repeating shapes on a Hopper GPU attend through sdpa's cuDNN
  kernel, elsewhere through flash attention (causal_attention()).

FastDecoderLayer keeps the same child modules under the same names as the layer it replaces, so state dicts,
adapter files and peft's calls are unchanged. It runs the fused function only when that computes what the
original layer would (no KV cache, sdpa or eager attention, one plain LoRA adapter without dropout, weights
this module can read); otherwise it calls the original layer's forward.
"""

import sys
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from utils import nf4_kernel
from utils.speed import _Fused, _FusedLoraMixin, _rms_norm, _rope, _silu_mul, compile_available

# ---------------------------------------------------------------------------------------------------------
# One projection: base weight (NF4 or dense) + optional LoRA adapter
# ---------------------------------------------------------------------------------------------------------


def _per_block(values, scales, blocksize, n):
    """values[i] * scales[i // blocksize] for i < n (a view, so Inductor fuses it into the consumer)."""
    return values * scales[:, None].expand(-1, blocksize).reshape(-1)[:n]


def dequantize_nf4(w, absmax, code, blocksize, shape, dtype, absmax2=None, code2=None, offset=None, blocksize2=None):
    """bitsandbytes' blockwise 4-bit dequantization in plain torch ops (bit-exact, tests/test_fused_layer.py):
    two codes per byte, the first in the high nibble; code[q] x absmax of its block, in fp32, rounded to dtype.
    With double quantization absmax itself is uint8 codes x fp32 scales per blocksize2 + offset. Compiled, it is
    one kernel fused with its neighbours instead of two bitsandbytes calls with their Python on the CPU."""
    n = 1
    for s in shape:
        n *= s
    if absmax2 is not None:
        absmax = _per_block(code2[absmax.view(-1).int()], absmax2.view(-1), blocksize2, absmax.numel()) + offset
    packed = w.view(-1)
    codes = torch.stack((packed >> 4, packed & 15), dim=-1).view(-1)[:n]
    return _per_block(code[codes.int()], absmax.view(-1), blocksize, n).to(dtype).view(shape)


def _weight(spec, dtype, w, absmax, code, absmax2, code2, offset):
    """The (out, in) weight in `dtype`; spec = (kind, shape, blocksize, quant_type, blocksize2). kind 'dense':
    w itself; 'nf4': bitsandbytes' packed 4-bit layout, with double quantization when absmax2 is given (absmax
    is then uint8 with its own fp32 scales). NF4 on a GPU where Triton runs (compile_available(), so
    LLAMA_QLORA_COMPILE=0 turns it off too): utils/nf4_kernel.py, called from inside the compiled layer; whenever
    torch.compile traces it elsewhere, dequantize_nf4; otherwise, and for FP4, bitsandbytes' own ops."""
    kind, shape, blocksize, quant_type, blocksize2 = spec
    if kind == "dense":
        return w if w.dtype == dtype else w.to(dtype)
    # (compiling on CUDA means Triton runs here; compile_available() is not evaluated while torch.compile traces)
    if w.is_cuda and quant_type == "nf4" and nf4_kernel.AVAILABLE \
            and (torch.compiler.is_compiling() or compile_available()) and nf4_kernel.works():
        return nf4_kernel.dequantize(w, absmax, code, blocksize, shape, dtype, absmax2, code2, offset, blocksize2)
    if (w.is_cuda or torch.compiler.is_compiling()) and quant_type == "nf4":
        return dequantize_nf4(w, absmax, code, blocksize, shape, dtype, absmax2, code2, offset, blocksize2)
    if absmax2 is not None:
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(absmax, absmax2, code2, blocksize2,
                                                                     torch.float32) + offset
    return torch.ops.bitsandbytes.dequantize_4bit.default(w, absmax, blocksize, quant_type, shape, dtype)


# out += a @ b in place (one GEMM with beta = 1). As an op that mutates `out`, torch.compile keeps it in place
# when `out` is not used elsewhere, where `out + a @ b` would become an addmm that first copies `out` into a new
# buffer. Declared with torch.library.Library rather than the custom_op decorator: the compiled layer calls it
# 14 to 21 times per layer and step, and custom_op's Python autograd wrapper cost ~40 us per call on the CPU
# against ~6 us for a plain kernel registration (no autograd formula is needed: _LoraProjections calls it
# with autograd off, and torch.compile traces it from there).
_LIB = torch.library.Library("llama_qlora", "FRAGMENT")
_LIB.define("mm_add_(Tensor(a!) out, Tensor a, Tensor b) -> ()")


def _mm_add_kernel(out, a, b):
    out.addmm_(a, b)


for _key in ("CPU", "CUDA"):
    _LIB.impl("mm_add_", _mm_add_kernel, _key)


@torch.library.register_fake("llama_qlora::mm_add_", lib=_LIB)
def _(out, a, b):
    return None


_mm_add_ = torch.ops.llama_qlora.mm_add_.default


def _kept(keep, spec, weight):
    """What a projection saves of its dequantized weight for the backward pass: the weight when `keep` and it
    is a 4-bit one (a dense weight is there anyway), else None (the backward pass dequantizes again)."""
    return weight if keep and spec[0] == "nf4" else None


class _Projection(torch.autograd.Function):
    """x W^T + b, for a projection without an adapter; `spec` = (kind, shape, blocksize, quant_type, blocksize2)
    is constant. Saves no dequantized W unless `keep` (see WeightKeeping): the backward pass dequantizes again."""

    @staticmethod
    def forward(ctx, x, keep, bias, spec, w, absmax, code, absmax2, code2, offset):
        x2 = x.reshape(-1, x.shape[-1])
        weight = _weight(spec, x.dtype, w, absmax, code, absmax2, code2, offset)
        out = F.linear(x2, weight, None if bias is None else bias.to(x.dtype))
        ctx.save_for_backward(w, absmax, code, absmax2, code2, offset, _kept(keep, spec, weight))
        ctx.spec, ctx.dtype = spec, x.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        *quant, kept = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(ctx.dtype)
        dx = g @ (kept if kept is not None else _weight(ctx.spec, ctx.dtype, *quant))
        return (dx.view(*grad.shape[:-1], dx.shape[-1]),) + (None,) * 9


def _zeros_like_output(x, out_features):
    """A zero (..., out_features) tensor that holds one element: what a gradients-only projection returns."""
    return x.new_zeros(()).expand(*x.shape[:-1], out_features)


def _out_features(spec, w):
    return w.shape[0] if spec[0] == "dense" else spec[1][0]


class _ProjectionGradients(_Projection):
    """_Projection's backward without its forward GEMM: for a recomputation that never reads the projection's
    output (see decoder_layer_gradients). The output is zeros."""

    @staticmethod
    def forward(ctx, x, keep, bias, spec, w, absmax, code, absmax2, code2, offset):
        ctx.save_for_backward(w, absmax, code, absmax2, code2, offset, None)
        ctx.spec, ctx.dtype = spec, x.dtype
        return _zeros_like_output(x, _out_features(spec, w))


_PARTS = 11  # a projection's arguments after x: a, b, bias, scale, spec, w, absmax, code, absmax2, code2, offset


def _cat(tensors, dim=0):
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


class _LoraProjections(torch.autograd.Function):
    """One or more projections of one input x, each with a LoRA adapter: x W^T + b + s (x A^T) B^T. Saves x and
    x A^T, not the dequantized W unless `keep` (see WeightKeeping): the backward pass dequantizes it again.
    Several projections of one input (q/k/v, gate/up) have their A matrices act as one, [A_1; A_2; ...], so
    x A^T, the input's adapter gradient and the A gradients are one GEMM each (x is read once, not once per
    projection), and the base GEMMs of the backward pass all add onto the same dx (no separate sum of the
    projections' input gradients)."""

    @staticmethod
    def forward(ctx, x, keep, *flat):
        parts = [flat[i:i + _PARTS] for i in range(0, len(flat), _PARTS)]
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        ranks = [p[0].shape[0] for p in parts]
        xa = x2 @ _cat([p[0].to(dtype) for p in parts]).t()  # (tokens, sum of the ranks)
        outs, kept = [], []
        for (_, b, bias, scale, spec, *quant), xa_i in zip(parts, xa.split(ranks, dim=1)):
            # peft's base + B(A x) s, summed inside the base GEMM: out = (x A^T)(s B)^T, then out += x W^T in
            # place (beta = 1). `base + lora` as a separate sum became an addmm under torch.compile, which copies
            # its input first: 9 full-size copies per layer and step (BENCHMARKS.md)
            out = xa_i @ (b.to(dtype) * scale).t()
            weight = _weight(spec, dtype, *quant)
            kept.append(_kept(keep, spec, weight))
            _mm_add_(out, x2, weight.t())
            if bias is not None:
                out = out + bias.to(dtype)
            outs.append(out.view(*x.shape[:-1], out.shape[-1]))
        _LoraProjections.save(ctx, x2, xa, parts, kept)
        return tuple(outs)

    @staticmethod
    def save(ctx, x2, xa, parts, kept):
        ctx.save_for_backward(x2, xa, *[t for p, w in zip(parts, kept) for t in (p[0], p[1], *p[5:], w)])
        ctx.ranks, ctx.scales, ctx.specs = [p[0].shape[0] for p in parts], [p[3] for p in parts], \
            [p[4] for p in parts]

    @staticmethod
    def backward(ctx, *grads):
        x2, xa, *saved = ctx.saved_tensors
        dtype = x2.dtype
        # a, b, w, absmax, code, absmax2, code2, offset, the kept dequantized weight (or None)
        per = [saved[i:i + 9] for i in range(0, len(saved), 9)]
        gs = [g.reshape(-1, g.shape[-1]).to(dtype) for g in grads]
        gb = _cat([(g @ p[1].to(dtype)) * s for g, p, s in zip(gs, per, ctx.scales)], dim=1)  # (tokens, r)
        dx = gb @ _cat([p[0].to(dtype) for p in per])
        for g, p, spec in zip(gs, per, ctx.specs):
            weight = p[8] if p[8] is not None else _weight(spec, dtype, *p[2:8])
            _mm_add_(dx, g, weight)  # dx += g W, in the base GEMM
        da = gb.t() @ x2  # (sum of the ranks, in)
        out = [dx.view(*grads[0].shape[:-1], dx.shape[-1]), None]
        for da_i, xa_i, g, p, s in zip(da.split(ctx.ranks), xa.split(ctx.ranks, dim=1), gs, per, ctx.scales):
            out += [da_i.to(p[0].dtype), (g.t() @ xa_i).mul(s).to(p[1].dtype)] + [None] * (_PARTS - 2)
        return tuple(out)


class _LoraGradients(_LoraProjections):
    """_LoraProjections' backward with only the part of its forward that the backward reads (x A^T): for a
    recomputation that never reads the projections' outputs (see decoder_layer_gradients). The outputs are
    zeros; the base and B GEMMs and the dequantization of W are skipped."""

    @staticmethod
    def forward(ctx, x, keep, *flat):
        parts = [flat[i:i + _PARTS] for i in range(0, len(flat), _PARTS)]
        x2 = x.reshape(-1, x.shape[-1])
        xa = x2 @ _cat([p[0].to(x.dtype) for p in parts]).t()
        _LoraProjections.save(ctx, x2, xa, parts, [None] * len(parts))
        return tuple(_zeros_like_output(x, p[1].shape[0]) for p in parts)


def _project(x, projections, gradients_only=False, keep=False):
    """Each projection p (projection_args) of x: all in one _LoraProjections when each has an adapter, else
    each on its own. gradients_only: the same backward pass, but the outputs are zeros and cost nothing.
    keep: 4-bit weights are kept dequantized from the forward pass for the backward pass (WeightKeeping)."""
    lora, plain = (_LoraGradients, _ProjectionGradients) if gradients_only else (_LoraProjections, _Projection)
    if all(p[0] is not None for p in projections):
        return lora.apply(x, keep, *[t for p in projections for t in p])
    return tuple(lora.apply(x, keep, *p)[0] if p[0] is not None else plain.apply(x, keep, p[2], *p[4:])
                 for p in projections)


def projection_args(module):
    """The arguments of _LoraProjections for `module` (a fused LoRA layer of utils/speed.py, a bitsandbytes Linear4bit
    or an nn.Linear), or None when this module cannot compute it exactly (then the original layer runs)."""
    a = b = None
    scale = 1.0
    if isinstance(module, _FusedLoraMixin):
        name = module._fused_adapter((), {})
        if name is None:
            return None
        a, b, scale = module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name]
        module = module.get_base_layer()
    elif hasattr(module, "base_layer"):  # a peft layer of another kind (DoRA, 8-bit, dropout): peft's forward
        return None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.requires_grad:
        return None
    state = getattr(weight, "quant_state", None)
    if state is None:
        if type(module) is not nn.Linear or weight.dim() != 2:
            return None
        spec, tensors = ("dense", None, None, None, None), (weight, None, None, None, None, None)
    else:
        if weight.dtype != torch.uint8 or getattr(state, "packing_format_for_cpu", False) \
                or state.quant_type not in ("nf4", "fp4"):
            return None  # FSDP's float storage, bitsandbytes' CPU inference layout, ...
        shape = [int(s) for s in state.shape]
        if state.nested:
            s2 = state.state2
            spec = ("nf4", shape, state.blocksize, state.quant_type, s2.blocksize)
            tensors = (weight, state.absmax, state.code, s2.absmax, s2.code, state.offset)
        else:
            spec = ("nf4", shape, state.blocksize, state.quant_type, None)
            tensors = (weight, state.absmax, state.code, None, None, None)
    return (a, b, module.bias, float(scale), spec, *tensors)


# ---------------------------------------------------------------------------------------------------------
# Attention over packed rows: flash attention by segment
# ---------------------------------------------------------------------------------------------------------

def _flash_by_segment():
    """Whether this torch has flash attention over cumulative segment lengths as an aten op with its autograd
    formula (aten::_flash_attention_forward, the kernel under sdpa's flash backend and under
    torch.nn.attention.varlen). That public wrapper is not used: depending on the torch version it picks cuDNN
    on Hopper, which builds a new plan for every new token count, i.e. at nearly every packed step."""
    op = getattr(torch.ops.aten, "_flash_attention_forward", None)
    schema = str(op.default._schema) if op is not None else ""
    return "cum_seq_q" in schema and "float? scale" in schema


FLASH_BY_SEGMENT = _flash_by_segment()


def _segment_attention(q, k, v, starts, longest, scale):
    """Causal attention within each segment of packed rows: q, k, v are (tokens, heads, head_dim) for all rows
    flattened, `starts` the int32 cumulative segment lengths over those tokens (0 first, all tokens last)."""
    return torch.ops.aten._flash_attention_forward(q, k, v, starts, starts, longest, longest, 0.0, True, False,
                                                   scale=scale)[0]


def sdpa_by_segment(q, k, v, starts, scale):
    """What _segment_attention computes, the plain way: sdpa on each segment alone (the one-time check's
    reference, and the CPU tests' stand-in for flash attention)."""
    bounds = starts.tolist()
    return torch.cat([F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)), is_causal=True,
                                                     scale=scale).transpose(0, 1)
                      for a, b in zip(bounds, bounds[1:])])


def flash_by_segment_on(device):
    """Whether flash attention by segment can run on `device`: this torch has it, and it is an NVIDIA GPU of
    compute capability >= 8.0 (not ROCm)."""
    device = torch.device(device)
    return FLASH_BY_SEGMENT and device.type == "cuda" and torch.version.hip is None \
        and torch.cuda.get_device_capability(device) >= (8, 0)


def _kernel_problem(kernel, reference, inputs, differs):
    """None where kernel(*inputs) computes what reference computes on the inputs in fp32, forward and backward
    (gradients on even inside no_grad or autocast: the first call may come in an evaluation pass); else what
    went wrong: `differs`, or the error it raised (a build or GPU without the kernel)."""
    try:
        with torch.enable_grad(), torch.autocast(inputs[0].device.type, enabled=False):
            out = kernel(*inputs)
            grads = torch.autograd.grad(out.float().square().sum(), inputs)
            ref = reference(*(t.float() for t in inputs))
            ref_grads = torch.autograd.grad(ref.square().sum(), inputs)
        tol = 2e-2 if inputs[0].dtype in (torch.bfloat16, torch.float16) else 1e-4
        same = torch.allclose(out.float(), ref, atol=tol, rtol=tol) and all(
            torch.allclose(a.float(), b.float(), atol=tol * max(1.0, b.abs().max().item()), rtol=tol)
            for a, b in zip(grads, ref_grads))
        return None if same else differs
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _checked(verdicts, key, check, note):
    """verdicts[key], from check() (a problem or None) the first time, with `note` and the problem on stderr
    where there is one."""
    if key not in verdicts:
        problem = check()
        if problem:
            print(f"note: {note} ({problem})", file=sys.stderr, flush=True)
        verdicts[key] = problem is None
    return verdicts[key]


_flash_checked = {}


def flash_by_segment_works(device, dtype, head_dim):
    """Whether flash attention by segment runs here and computes what sdpa computes on each segment alone:
    checked once per (device, dtype, head size) on two short segments, forward and backward, so that a GPU or
    build where it fails keeps the mask path (with a note) instead of stopping the first training step."""
    def check():
        g = torch.Generator().manual_seed(0)
        qkv = tuple(torch.randn(16, 2, head_dim, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
        starts = torch.tensor([0, 5, 16], dtype=torch.int32, device=device)
        return _kernel_problem(lambda q, k, v: _segment_attention(q, k, v, starts, 11, head_dim ** -0.5),
                               lambda q, k, v: sdpa_by_segment(q, k, v, starts, head_dim ** -0.5), qkv,
                               "its result differs from sdpa's on each example alone")
    return _checked(_flash_checked, (str(device), dtype, head_dim), check,
                    "packed rows use the block-diagonal mask here, not flash attention by example")


def segments(hidden_states, kwargs, head_dim, scaling):
    """(cumulative segment lengths, longest segment) for flash attention by segment, from what packed_collate
    passes with a packed batch (cu_seq_lens_q / max_length_q, the names transformers' flash-attention path
    reads), or None when flash attention does not apply here (flash_by_segment_on), the dtype is not bf16/fp16,
    the head size is one it lacks, its one-time check failed (flash_by_segment_works), or there are no such
    arguments. Then the 4-D block-diagonal mask transformers builds from the same position ids is used, with
    sdpa's kernels: exact too, but each row's attention then costs (row length)^2, not the sum of (segment
    length)^2."""
    starts, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if not isinstance(starts, torch.Tensor) or not isinstance(longest, int) \
            or starts.device != hidden_states.device or not flash_by_segment_on(hidden_states.device) \
            or hidden_states.dtype not in (torch.bfloat16, torch.float16) or head_dim % 8 or head_dim > 256 \
            or not flash_by_segment_works(hidden_states.device, hidden_states.dtype, head_dim):
        return None
    starts = starts.to(torch.int32)
    # the number of segments changes at every step: compiled for any number from the first, rather than for
    # this one and then again (one more compile of the layer in each grad mode: ~12 s in all for a 7B layer on
    # an H200, BENCHMARKS.md)
    torch._dynamo.maybe_mark_dynamic(starts, 0)
    return starts, longest


# ---------------------------------------------------------------------------------------------------------
# Causal attention of unpacked rows through cuDNN, where the shapes repeat
# ---------------------------------------------------------------------------------------------------------

# `mask` value for the fused layer: causal attention through sdpa's cuDNN kernel. On an H200 it ran a 7B layer's
# attention (8 x 512 tokens, forward + backward) in 0.20 ms against flash attention's 0.44 (BENCHMARKS.md). But
# cuDNN builds a plan for each new shape, so it is used only while training has seen at most CUDNN_SHAPES
# shapes of unpacked rows: fixed-length rows get it from the first step; rows whose length keeps changing go
# back to flash attention for good (one more compile of the layer in each grad mode).
CUDNN_CAUSAL = "causal attention through cuDNN"
CUDNN_SHAPES = 2
_causal_shapes = set()
_cudnn_checked = {}


def cudnn_causal_on(device):
    """Whether cuDNN causal attention is tried on `device`: an NVIDIA Hopper GPU (compute capability 9.x, where
    it was measured) with cuDNN, in a torch whose sdpa has the backend."""
    device = torch.device(device)
    return device.type == "cuda" and torch.version.hip is None and hasattr(SDPBackend, "CUDNN_ATTENTION") \
        and torch.backends.cudnn.is_available() and torch.cuda.get_device_capability(device)[0] == 9


def cudnn_causal_works(device, dtype, head_dim):
    """Whether sdpa's cuDNN kernel runs causal attention here and computes what sdpa computes in fp32,
    forward and backward: checked once per (device, dtype, head size), so that a build where it fails keeps
    flash attention (with a note) instead of stopping a training step."""
    def cudnn(q, k, v):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def check():
        g = torch.Generator().manual_seed(0)
        qkv = tuple(torch.randn(2, 4, 64, head_dim, generator=g).to(device, dtype).requires_grad_() for _ in "qkv")
        return _kernel_problem(cudnn, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                               qkv, "its result differs from sdpa's in fp32")
    return _checked(_cudnn_checked, (str(device), dtype, head_dim), check,
                    "causal attention uses flash attention here, not cuDNN")


def causal_attention(hidden_states, head_dim):
    """The fused layer's `mask` for unpacked rows: None (sdpa's causal kernel as torch picks it; cuDNN is
    switched off in training by utils/speed.py) or CUDNN_CAUSAL, by the rule above."""
    batch, seq = hidden_states.shape[:2]
    if seq < 2 or hidden_states.dtype not in (torch.bfloat16, torch.float16) or head_dim % 8 or head_dim > 128 \
            or not cudnn_causal_on(hidden_states.device):
        return None
    if len(_causal_shapes) <= CUDNN_SHAPES:
        _causal_shapes.add((batch, seq))
    if len(_causal_shapes) > CUDNN_SHAPES \
            or not cudnn_causal_works(hidden_states.device, hidden_states.dtype, head_dim):
        return None
    return CUDNN_CAUSAL


# ---------------------------------------------------------------------------------------------------------
# Attention masks made without waiting for the GPU
# ---------------------------------------------------------------------------------------------------------

# transformers' mask code (create_causal_mask) reads the position ids on the CPU to tell packed rows from
# unpacked ones (or a 2-D mask, to see whether it pads anything): one wait for the GPU at every forward pass,
# so the CPU starts each step's forward pass with nothing queued ahead of the GPU. Where the batch itself says
# what it is (packed_collate: no position ids for unpacked rows; where each segment starts for packed rows),
# attention_mask_hook passes the mask ready-made instead; transformers uses a 4-D mask as given.
_causal_masks = {}


def _causal(length, device):
    """The (length, length) boolean causal mask (True = attends), cached for the last few lengths."""
    key = (str(device), length)
    if key not in _causal_masks:
        if len(_causal_masks) >= 4:
            _causal_masks.clear()
        _causal_masks[key] = torch.ones(length, length, dtype=torch.bool, device=device).tril_()
    return _causal_masks[key]


def plain_causal_mask(batch, length, device):
    """A (batch, 1, length, length) boolean causal mask, a view of the cached one, marked as plain causal:
    fused layers then run sdpa's causal kernels, not the masked ones."""
    mask = _causal(length, device).expand(batch, 1, length, length)
    mask.plain_causal = True
    return mask


def is_plain_causal(mask):
    return getattr(mask, "plain_causal", False)


def block_causal_mask(position_ids):
    """The (batch, 1, length, length) boolean mask transformers makes for packed rows: each token attends to
    the tokens before it within its own segment, a segment starting wherever the position id does not follow
    on from the one before. Computed on the GPU, without reading anything back."""
    follows = position_ids[:, 1:] == position_ids[:, :-1] + 1
    segment = torch.cat((torch.zeros_like(follows[:, :1]), ~follows), dim=1).cumsum(-1)
    causal = _causal(position_ids.shape[1], position_ids.device)
    return ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]


def attention_mask_hook(module, args, kwargs):
    """Forward pre-hook (with kwargs) of a decoder stack whose layers are FastDecoderLayers, with sdpa
    attention: without an attention mask, a cache or positional arguments, it passes the mask itself: plain
    causal when there are no position ids, block-diagonal when packed_collate says where segments start
    (cu_seq_lens_q). Anything else goes to transformers unchanged."""
    if args or kwargs.get("attention_mask") is not None or kwargs.get("past_key_values") is not None \
            or kwargs.get("cache") is not None or getattr(module.config, "_attn_implementation", None) != "sdpa":
        return None
    use_cache = kwargs.get("use_cache")
    if use_cache or (use_cache is None and getattr(module.config, "use_cache", False)):
        return None
    tokens = kwargs.get("input_ids")
    tokens = kwargs.get("inputs_embeds") if tokens is None else tokens
    if tokens is None:
        return None
    batch, length = tokens.shape[:2]
    positions = kwargs.get("position_ids")
    if positions is None:
        mask = plain_causal_mask(batch, length, tokens.device)
    elif isinstance(kwargs.get("cu_seq_lens_q"), torch.Tensor) and positions.shape == (batch, length):
        mask = block_causal_mask(positions.to(tokens.device))
    else:
        return None
    return args, {**kwargs, "attention_mask": mask}


# ---------------------------------------------------------------------------------------------------------
# The decoder layer as one function
# ---------------------------------------------------------------------------------------------------------

def _attention(h, cos, sin, mask, norm1, consts, q, k, v):
    """The attention half of a layer up to o_proj's input: (batch, seq, heads x head_dim)."""
    n_heads, n_kv, head_dim, scaling, eps1, _, keep = consts
    batch, seq = h.shape[:2]
    x = _rms_norm(h, norm1, eps1)
    qs, ks, vs = _project(x, (q, k, v), keep=keep)
    qs = qs.view(batch, seq, n_heads, head_dim).transpose(1, 2)
    ks = ks.view(batch, seq, n_kv, head_dim).transpose(1, 2)
    vs = vs.view(batch, seq, n_kv, head_dim).transpose(1, 2)
    qs, ks = _rope(qs, ks, cos, sin)
    if n_kv != n_heads:  # grouped-query attention: each key/value head serves n_heads / n_kv query heads
        rep = n_heads // n_kv
        ks = ks[:, :, None].expand(batch, n_kv, rep, seq, head_dim).reshape(batch, n_heads, seq, head_dim)
        vs = vs[:, :, None].expand(batch, n_kv, rep, seq, head_dim).reshape(batch, n_heads, seq, head_dim)
    if isinstance(mask, tuple):  # packed rows: every token of every row in one list, attention by segment
        def tokens(t):
            return t.transpose(1, 2).reshape(batch * seq, n_heads, head_dim)
        attn = _segment_attention(tokens(qs), tokens(ks), tokens(vs), *mask, scaling)
    elif isinstance(mask, str):  # CUDNN_CAUSAL
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            attn = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling).transpose(1, 2)
    else:
        attn = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=mask is None and seq > 1,
                                              scale=scaling).transpose(1, 2)
    return attn.reshape(batch, seq, n_heads * head_dim)


def _mlp_input(middle, norm2, eps2, gate, up, keep=False):
    """silu(gate) x up of the post-attention residual: down_proj's input."""
    return _silu_mul(*_project(_rms_norm(middle, norm2, eps2), (gate, up), keep=keep))


def decoder_layer_and_middle(h, cos, sin, mask, norm1, norm2, consts, q, k, v, o, gate, up, down):
    """LlamaDecoderLayer.forward without a cache (pre-norm attention and SwiGLU MLP, each with a residual), and
    its residual stream between the two (what a checkpointed layer keeps besides its input). `mask`: None
    (causal), CUDNN_CAUSAL (causal, through cuDNN), a 4-D attention mask, or (cumulative segment lengths,
    longest segment) from segments() for packed rows (flash attention by segment). consts = (heads, key/value
    heads, head size, attention scale, the two norms' epsilons, keep: whether 4-bit weights are kept dequantized
    for the backward pass, WeightKeeping)."""
    keep = consts[6]
    middle = h + _project(_attention(h, cos, sin, mask, norm1, consts, q, k, v), (o,), keep=keep)[0]
    return middle + _project(_mlp_input(middle, norm2, consts[5], gate, up, keep), (down,), keep=keep)[0], middle


def decoder_layer(h, *args):
    """LlamaDecoderLayer.forward without a cache (see decoder_layer_and_middle)."""
    return decoder_layer_and_middle(h, *args)[0]


def decoder_layer_gradients(h, middle, cos, sin, mask, norm1, norm2, consts, q, k, v, o, gate, up, down):
    """The recomputation of a checkpointed layer, given its input h and its middle residual from the forward
    pass: the returned tensor has decoder_layer's graph (the same gradients for every input), not its value.
    What the backward pass never reads is not recomputed: o_proj's output (its only use is the middle residual,
    which is given) and down_proj's (it only adds onto the layer's output). Their projections run just the
    adapters' x A^T, so a third of the base FLOPs of the recomputation are skipped: the two GEMMs and their NF4
    dequantization. The value returned is the middle residual, the output's gradient reaching it whole."""
    attn = _attention(h, cos, sin, mask, norm1, consts, q, k, v)
    middle = _Given.apply(h + _project(attn, (o,), gradients_only=True)[0], middle)
    return middle + _project(_mlp_input(middle, norm2, consts[5], gate, up), (down,), gradients_only=True)[0]


class _Given(torch.autograd.Function):
    """`value`, known from the forward pass, standing in the graph for `computed`: the gradient goes to
    `computed`, whose own value is never read (so, compiled, it is never computed)."""

    @staticmethod
    def forward(ctx, computed, value):
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


# Compiled once on CUDA, shared by every layer. Without cse=False, AOTAutograd would merge the backward's
# dequantization of each weight with the forward's, and the merged full-precision weight would then be saved
# for the backward pass: seven weights per layer (~390 MiB per 7B layer), the reverse of what _LoraProjections does.
# Inductor's debug checks of every input's and output's size, stride and alignment are off here: ~160 Python
# calls per layer and step (forward and backward), and without checkpointing the forward pass waits for the CPU.
# Dynamo's guards still check the inputs' shapes and strides before each call.
# run_layer serves training without checkpointing; every call without gradients (a checkpointed layer's forward,
# evaluation) goes to run_layer_and_middle, and a checkpointed layer's recomputation to run_layer_gradients, so a
# run compiles each of the three in one grad mode only.
_COMPILE = dict(dynamic=None, functorch_config={"cse": False},
                inductor_options={"size_asserts": False, "alignment_asserts": False, "scalar_asserts": False})
run_layer = _Fused(decoder_layer, **_COMPILE)
run_layer_and_middle = _Fused(decoder_layer_and_middle, **_COMPILE)
run_layer_gradients = _Fused(decoder_layer_gradients, **_COMPILE)


# ---------------------------------------------------------------------------------------------------------
# Checkpointing with the layer input parked in CPU memory
# ---------------------------------------------------------------------------------------------------------

class _Parked:
    """Tensors parked in pinned CPU memory; `ready` is their copy back to the GPU when one was started early,
    `previous` (a weak reference) what was parked before them, whose turn comes next in the backward pass;
    `single`: one tensor was parked, not a tuple."""
    __slots__ = ("cpu", "device", "ready", "previous", "single", "__weakref__")

    def __init__(self, cpu, device, previous, single):
        self.cpu, self.device, self.ready, self.previous, self.single = cpu, device, None, previous, single


class _Offload:
    """Copies of layer inputs (a tensor, or a tuple of tensors that come back together) to pinned CPU memory on
    a side stream, and back. The backward pass meets them in the reverse order of the forward, so fetching one
    starts copying the one parked before it on the side stream, and that copy overlaps the layer's
    recomputation. On the CPU: kept as they are."""

    def __init__(self):
        self.stream, self.last = None, None

    def park(self, tensors):
        single = isinstance(tensors, torch.Tensor)
        tensors = (tensors,) if single else tuple(tensors)
        if not tensors[0].is_cuda:
            return tensors[0] if single else tensors
        device = tensors[0].device
        if self.stream is None:
            self.stream = torch.cuda.Stream(device)
        main = torch.cuda.current_stream(device)
        cpu = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors)
        self.stream.wait_stream(main)  # the tensors are complete
        with torch.cuda.stream(self.stream):
            for c, t in zip(cpu, tensors):
                c.copy_(t, non_blocking=True)
        for t in tensors:
            t.record_stream(self.stream)  # its memory is not reused before the copy has read it
        parked = _Parked(cpu, device, self.last, single)
        self.last = weakref.ref(parked)
        return parked

    def fetch(self, parked, device):
        if not isinstance(parked, _Parked):
            return parked
        main = torch.cuda.current_stream(device)
        main.wait_stream(self.stream)  # the copy to the CPU, and any early copy back, have finished
        tensors, parked.ready = parked.ready, None
        if tensors is None:
            tensors = tuple(c.to(device, non_blocking=True) for c in parked.cpu)
        previous = parked.previous() if parked.previous is not None else None
        if previous is not None and previous.ready is None and previous.device == device:
            previous.ready = self._copy_back(previous, main)
        return tensors[0] if parked.single else tensors

    def _copy_back(self, parked, main):
        tensors = tuple(torch.empty(c.shape, dtype=c.dtype, device=parked.device) for c in parked.cpu)
        self.stream.wait_stream(main)  # their memory may have been freed by kernels still queued there
        with torch.cuda.stream(self.stream):
            for t, c in zip(tensors, parked.cpu):
                t.copy_(c, non_blocking=True)
        for t in tensors:
            t.record_stream(self.stream)
        return tensors


offload = _Offload()


class _CheckpointedLayer(torch.autograd.Function):
    """Forward without keeping activations but the layer's input and middle residual (on a GPU parked in CPU
    memory); backward recomputes what the layer's gradients need from those two (decoder_layer_gradients) and
    returns the gradients of the input and of the trainable tensors, like any autograd function."""

    @staticmethod
    def forward(ctx, layer_args, park, h, *trainable):
        with torch.no_grad():
            out, middle = run_layer_and_middle(h, *layer_args)
        ctx.layer_args, ctx.device = layer_args, h.device
        ctx.parked = offload.park((h, middle)) if park else (h, middle)
        ctx.trainable = trainable  # parameters: alive anyway, and autograd.grad needs these very tensors
        return out

    @staticmethod
    def backward(ctx, grad):
        trainable = ctx.trainable
        h, middle = offload.fetch(ctx.parked, ctx.device)
        h = h.detach().requires_grad_(ctx.needs_input_grad[2])
        ctx.parked = ctx.trainable = None
        with torch.enable_grad():
            out = run_layer_gradients(h, middle, *ctx.layer_args)
        wanted = ([h] if h.requires_grad else []) + [t for t in trainable if t.requires_grad]
        grads = list(torch.autograd.grad(out, wanted, grad, allow_unused=True))
        dh = grads.pop(0) if h.requires_grad else None
        dtrain = [grads.pop(0) if t.requires_grad else None for t in trainable]
        return (None, None, dh, *dtrain)


# ---------------------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------------------

PROJECTIONS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
               ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


class FastDecoderLayer(nn.Module):
    """Same children (self_attn, mlp, input_layernorm, post_attention_layernorm) as the layer it replaces; its
    forward runs decoder_layer when that is exact here, else the original layer's forward."""

    def __init__(self, layer, park_inputs=True):
        super().__init__()
        self.self_attn, self.mlp = layer.self_attn, layer.mlp
        self.input_layernorm, self.post_attention_layernorm = layer.input_layernorm, layer.post_attention_layernorm
        self._original = [layer]  # in a list: not a child, so no second copy in the state dict
        self.gradient_checkpointing = getattr(layer, "gradient_checkpointing", False)  # set by transformers
        self.park_inputs = park_inputs
        attn = layer.self_attn
        self.consts = (attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim,
                       float(attn.scaling), float(self.input_layernorm.variance_epsilon),
                       float(self.post_attention_layernorm.variance_epsilon))
        self.keep_weights, self.weight_keeping = False, None  # set by WeightKeeping

    def original_forward(self, *args, **kwargs):
        return type(self._original[0]).forward(self._original[0], *args, **kwargs)

    def fused_args(self, hidden_states, attention_mask, position_embeddings, kwargs, keep=False):
        if position_embeddings is None or kwargs.get("past_key_values") is not None \
                or kwargs.get("cache") is not None or kwargs.get("output_attentions"):
            return None
        attn = self.self_attn
        if attn.config._attn_implementation not in ("sdpa", "eager") \
                or (self.training and getattr(attn, "attention_dropout", 0.0)):
            return None
        if attention_mask is not None and attention_mask.dim() != 4:
            return None
        packed = segments(hidden_states, kwargs, attn.head_dim, float(attn.scaling))
        if packed is None and (attention_mask is None or is_plain_causal(attention_mask)):
            attention_mask = causal_attention(hidden_states, attn.head_dim) if self.training else None
        projections = []
        for parent, name in PROJECTIONS:
            p = projection_args(getattr(getattr(self, parent), name))
            if p is None:
                return None
            projections.append(p)
        cos, sin = position_embeddings
        return (cos, sin, attention_mask if packed is None else packed, self.input_layernorm.weight,
                self.post_attention_layernorm.weight, (*self.consts, bool(keep)), *projections)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, position_embeddings=None, **kwargs):
        # training without checkpointing: the one case where the backward pass follows this forward pass with
        # the layer's activations kept, and may reuse its dequantized weights (WeightKeeping)
        plain_training = self.training and torch.is_grad_enabled() and not self.gradient_checkpointing
        if plain_training and self.weight_keeping is not None:
            self.weight_keeping.before(self, hidden_states)
        args = self.fused_args(hidden_states, attention_mask, position_embeddings, kwargs,
                               keep=plain_training and self.keep_weights)
        if args is None:
            return self.original_forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                         position_embeddings=position_embeddings, **kwargs)
        if not torch.is_grad_enabled():
            return run_layer_and_middle(hidden_states, *args)[0]
        if not (self.gradient_checkpointing and self.training):
            return run_layer(hidden_states, *args)
        trainable = [t for p in args[6:] for t in p[:2] if t is not None and t.requires_grad]
        return _CheckpointedLayer.apply(args, self.park_inputs, hidden_states, *trainable)


def kept_bytes(layer, dtype):
    """What keeping a FastDecoderLayer's dequantized 4-bit weights costs in `dtype`, in bytes (0 for a 16-bit
    base, whose weights are there anyway)."""
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for parent, name in PROJECTIONS:
        p = projection_args(getattr(getattr(layer, parent), name))
        if p is not None and p[4][0] == "nf4":
            total += p[4][1][0] * p[4][1][1] * size
    return total


def layers_that_fit(per_layer, layers, total, free, reserved, peak_reserved, share):
    """How many of `layers` layers can keep `per_layer` bytes each on a GPU of `total` bytes with `free` free
    now, of which this process has `reserved` (torch's caching allocator) and reserved at most `peak_reserved`
    so far, so that the whole GPU stays within `share` of its memory at the peak. What other processes and the
    CUDA context hold (total - free - reserved) counts against the share."""
    if per_layer <= 0:
        return 0
    others = total - free - reserved
    room = share * total - others - peak_reserved
    return max(0, min(layers, int(room // per_layer)))


def _cuda_memory(device):
    free, total = torch.cuda.mem_get_info(device)
    return total, free, torch.cuda.memory_reserved(device), torch.cuda.max_memory_reserved(device)


class WeightKeeping:
    """Which fused layers keep their dequantized 4-bit weights from the forward pass for the backward pass in
    training without checkpointing, instead of dequantizing them again there: ~2% faster on a 7B (one of the
    two dequantizations of every weight, and its kernel launches, BENCHMARKS.md) for the bf16 weights of every
    such layer alive from its forward pass to its backward pass (~390 MiB per 7B layer, ~12 GiB in all).
    mode 'on': every layer; 'off': none; 'auto': none in the first step, then on a GPU as many layers as fit
    within SHARE of its memory at the first step's peak (layers_that_fit), decided once at the second step.
    With checkpointing nothing is kept whatever the mode."""

    MODES = ("auto", "on", "off")
    SHARE = 0.9

    def __init__(self, layers, mode="auto"):
        if mode not in self.MODES:
            raise ValueError(f"keep_dequantized must be one of {', '.join(self.MODES)}, not {mode!r}")
        self.layers, self.mode = list(layers), mode
        self.decided, self.passes = mode != "auto", 0
        for layer in self.layers:
            layer.weight_keeping, layer.keep_weights = self, mode == "on"

    @property
    def kept(self):
        """How many layers keep their weights."""
        return sum(layer.keep_weights for layer in self.layers)

    def before(self, layer, hidden_states):
        """Called by each layer before a training forward pass without checkpointing: in 'auto' mode, counts the
        first layer's passes and decides at its second, when the first step's peak memory is known."""
        if self.decided or layer is not self.layers[0]:
            return
        self.passes += 1
        if self.passes < 2:
            return
        self.decided = True
        if hidden_states.is_cuda:
            self.decide(hidden_states.dtype)

    def decide(self, dtype, memory=None):
        """Sets which layers keep their weights, by layers_that_fit on each layer's GPU; `memory`: device ->
        (total, free, reserved, peak reserved) in bytes, by default torch.cuda's figures."""
        memory = memory or _cuda_memory
        by_device = {}
        for each in self.layers:
            by_device.setdefault(each.input_layernorm.weight.device, []).append(each)
        notes = []
        for device, layers in by_device.items():
            per_layer = kept_bytes(layers[0], dtype)
            n = layers_that_fit(per_layer, len(layers), *memory(device), self.SHARE)
            for each in layers[:n]:
                each.keep_weights = True
            if per_layer:
                notes.append(f"{n} of {len(layers)} layers on {device} (+{n * per_layer / 2**30:.1f} GiB)")
        if notes:
            print(f"note: without checkpointing, the dequantized 4-bit weights of {', '.join(notes)} are kept for "
                  f"the backward pass (what fits in {self.SHARE:.0%} of the GPU's memory; --keep_dequantized "
                  "on|off to choose)", file=sys.stderr, flush=True)

    def describe(self):
        if self.mode == "on":
            return "dequantized weights kept for the backward pass without checkpointing"
        if self.mode == "off":
            return "weights dequantized again in the backward pass"
        if not self.decided:
            return "dequantized weights kept for the backward pass without checkpointing as memory allows"
        return f"dequantized weights of {self.kept} layers kept for the backward pass without checkpointing"


def fuse_decoder_layers(model, park_inputs=True):
    """Replace each LLaMA-style decoder layer of `model` by a FastDecoderLayer after checking, on random input,
    that the fused function gives the original layer's output. Returns how many were replaced."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if is_llama_layer(child) and _same_output(child):
                setattr(parent, name, FastDecoderLayer(child, park_inputs))
                count += 1
    return count


def is_llama_layer(module):
    attn, mlp = getattr(module, "self_attn", None), getattr(module, "mlp", None)
    if attn is None or mlp is None or not hasattr(module, "input_layernorm") \
            or not hasattr(module, "post_attention_layernorm"):
        return False
    if any(hasattr(attn, n) for n in ("q_norm", "k_norm", "sliding_window")) or getattr(attn, "is_sliding", False):
        return False  # Qwen3 / Gemma-style extras the fused function does not compute
    config = getattr(attn, "config", None)
    needed = ("num_attention_heads", "num_key_value_heads")
    return config is not None and all(hasattr(config, n) for n in needed) and hasattr(attn, "head_dim") \
        and hasattr(attn, "scaling") and all(hasattr(getattr(module, p), n) for p, n in PROJECTIONS) \
        and _is_silu_mlp(mlp) and all(hasattr(getattr(module, n), "variance_epsilon")
                                      for n in ("input_layernorm", "post_attention_layernorm"))


def _is_silu_mlp(mlp):
    if type(mlp).__name__ == "FusedSwiGLU":  # utils/speed.py checked its SiLU already
        return True
    return type(getattr(mlp, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")


def _same_output(layer):
    """The fused function and the original forward agree on a short random sequence. Run in training mode
    (without gradients): in eval mode bitsandbytes would repack CPU weights into its inference layout."""
    weight = layer.input_layernorm.weight
    dim, dtype, device = weight.shape[0], weight.dtype, weight.device
    head_dim = layer.self_attn.head_dim
    g = torch.Generator(device).manual_seed(0)
    # a small input: the norm rescales it, so the layer's own contribution dominates the output and is what
    # the comparison sees (with a large input, bf16 rounding of the residual sum would hide or fake a difference)
    h = (torch.randn((1, 5, dim), generator=g, device=device) * 1e-2).to(dtype)
    angles = torch.arange(5, device=device, dtype=torch.float32)[:, None] * torch.linspace(0, 1, head_dim // 2,
                                                                                           device=device)
    angles = torch.cat((angles, angles), dim=-1)[None]
    position = (angles.cos().to(dtype), angles.sin().to(dtype))
    fast = FastDecoderLayer(layer, park_inputs=False)
    was_training = layer.training
    layer.train()
    try:
        with torch.no_grad():
            args = fast.fused_args(h, None, position, {})
            if args is None:
                return False
            mine = decoder_layer(h, *args)
            theirs = fast.original_forward(h, attention_mask=None, position_embeddings=position,
                                           position_ids=torch.arange(5, device=device)[None])
    finally:
        layer.train(was_training)
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    if mine.shape != theirs.shape:
        return False
    # compare what the layer adds to its input: in bf16 the sum itself is only good to the input's rounding
    error = (mine.float() - theirs.float()).norm() / (theirs.float() - h.float()).norm().clamp_min(1e-12)
    return error.item() < (1e-4 if dtype == torch.float32 else 2e-2)
