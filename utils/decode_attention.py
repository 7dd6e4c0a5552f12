"""One decoding step's attention in three Triton kernels (CUDA only), for the CUDA-graph decoder (utils/decoder.py).

At batch 1 a step's query is one token. Done with torch ops, its attention is a RoPE kernel, two cache writes,
then either a masked sdpa kernel or (over long caches) two batched matmuls with a scale, a mask, a softmax and
a cast in between, and a transpose copy: ~10 kernels a layer, over every slot of the captured span. Here:
1. `_rope_store_kernel`: RoPE on the query and key heads; the key and value written into the cache at the
   step's position (read from a device tensor, so one CUDA graph serves every position);
2. `_attend_split_kernel`: a program per (query head, run of SPLIT slots) computes a softmax-weighted sum
   over its run of the slots in use (positions 0..pos): a partial result with its running maximum and sum;
3. `_combine_kernel`: a program per head rescales the runs' partial results to one maximum and adds them,
   writing the heads side by side, the layout o_proj reads.
Slots beyond the position are never read, so a long captured span costs only the programs that exit at once.
Scores, softmax and sums are in fp32. `works()` checks the kernels once against torch ops before they are used.
"""

import importlib.util
import sys

import torch
import torch.nn.functional as F

# The second kernel's launch settings, from a sweep on an H200 (BENCHMARKS.md, 2026-11-29, sixth session): 32
# layers of a 7B shape's attention at positions 1,000 / 2,900 / 4,000 took 13.1 / 23.3 / 27.2 us a layer
# (rope and combine included), against 17.5 / 35.8 / 40.4 with 32-slot blocks and 4 warps.
BLOCK = 64  # cache slots loaded at once by a program
SPLIT_MIN = 64  # cache slots per program, at least
WARPS = 2  # warps per program
MAX_SPLITS = 64  # runs per head at most (the combine kernel holds them all, whatever the span: one compile)


def _importable():
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


AVAILABLE = _importable()

if AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _rope_store_kernel(q, k, v, cos, sin, pos_ptr, q_out, k_cache, v_cache, head_stride,
                           HEADS: tl.constexpr, D: tl.constexpr):
        head = tl.program_id(0)
        half = tl.arange(0, D // 2)
        c1 = tl.load(cos + half).to(tl.float32)
        c2 = tl.load(cos + D // 2 + half).to(tl.float32)
        s1 = tl.load(sin + half).to(tl.float32)
        s2 = tl.load(sin + D // 2 + half).to(tl.float32)
        if head < HEADS:  # a query head: x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]
            x1 = tl.load(q + head * D + half).to(tl.float32)
            x2 = tl.load(q + head * D + D // 2 + half).to(tl.float32)
            tl.store(q_out + head * D + half, (x1 * c1 - x2 * s1).to(q_out.dtype.element_ty))
            tl.store(q_out + head * D + D // 2 + half, (x2 * c2 + x1 * s2).to(q_out.dtype.element_ty))
        else:  # a key/value head: the rotated key and the value go into the cache slot `pos`
            kv = head - HEADS
            x1 = tl.load(k + kv * D + half).to(tl.float32)
            x2 = tl.load(k + kv * D + D // 2 + half).to(tl.float32)
            slot = kv.to(tl.int64) * head_stride + tl.load(pos_ptr) * D
            tl.store(k_cache + slot + half, (x1 * c1 - x2 * s1).to(k_cache.dtype.element_ty))
            tl.store(k_cache + slot + D // 2 + half, (x2 * c2 + x1 * s2).to(k_cache.dtype.element_ty))
            d = tl.arange(0, D)
            tl.store(v_cache + slot + d, tl.load(v + kv * D + d))

    @triton.jit(do_not_specialize=["n_split"])  # one compiled kernel for every span
    def _attend_split_kernel(q, k_cache, v_cache, pos_ptr, m_out, l_out, acc_out, scale, head_stride, n_split,
                             REP: tl.constexpr, D: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
        head = tl.program_id(0)
        split = tl.program_id(1)
        d = tl.arange(0, D)
        query = tl.load(q + head * D + d).to(tl.float32) * scale
        start = split * SPLIT
        end = tl.minimum(start + SPLIT, tl.load(pos_ptr).to(tl.int32) + 1)  # slots 0..pos are in use
        base = (head // REP).to(tl.int64) * head_stride
        top = -float("inf")  # running maximum of the scores
        total = 0.0  # running sum of exp(score - top)
        acc = tl.zeros([D], dtype=tl.float32)
        for first in range(start, end, BLOCK):
            slots = first + tl.arange(0, BLOCK)
            inside = slots < end
            where = base + slots[:, None].to(tl.int64) * D + d[None, :]
            keys = tl.load(k_cache + where, mask=inside[:, None], other=0.0).to(tl.float32)
            scores = tl.where(inside, tl.sum(keys * query[None, :], axis=1), -float("inf"))
            new_top = tl.maximum(top, tl.max(scores, axis=0))  # finite: the block's first slot is inside
            weights = tl.exp(scores - new_top)
            rescale = tl.exp(top - new_top)
            values = tl.load(v_cache + where, mask=inside[:, None], other=0.0).to(tl.float32)
            acc = acc * rescale + tl.sum(weights[:, None] * values, axis=0)
            total = total * rescale + tl.sum(weights, axis=0)
            top = new_top
        row = head * n_split + split  # a run past the position stores top = -inf, total = 0: weight 0 below
        tl.store(m_out + row, top)
        tl.store(l_out + row, total)
        tl.store(acc_out + row * D + d, acc)

    @triton.jit(do_not_specialize=["n_split"])
    def _combine_kernel(m_in, l_in, acc_in, out, n_split, D: tl.constexpr, SPLITS: tl.constexpr):
        head = tl.program_id(0)
        runs = tl.arange(0, SPLITS)
        used = runs < n_split
        d = tl.arange(0, D)
        tops = tl.load(m_in + head * n_split + runs, mask=used, other=-float("inf"))
        weight = tl.exp(tops - tl.max(tops, axis=0))  # run 0 always holds slot 0, so the maximum is finite
        totals = tl.load(l_in + head * n_split + runs, mask=used, other=0.0)
        acc = tl.load(acc_in + (head * n_split + runs)[:, None] * D + d[None, :], mask=used[:, None], other=0.0)
        o = tl.sum(weight[:, None] * acc, axis=0) / tl.sum(weight * totals, axis=0)
        tl.store(out + head * D + d, o.to(out.dtype.element_ty))


def split_size(span):
    """Cache slots per program of the second kernel: 64 up to 4,096 slots (a 7B model's 32 heads then make up
    to 2,048 programs), then growing so that a head has at most MAX_SPLITS runs."""
    size = SPLIT_MIN
    while -(-span // size) > MAX_SPLITS:
        size *= 2
    return size


def attend(q, k, v, cos, sin, pos, k_cache, v_cache, span, scale):
    """One token's attention output (1, 1, heads * head_dim) in q's dtype, after writing its rotated key and
    its value into slot `pos` of the caches. q (1, 1, heads * head_dim), k and v (1, 1, kv_heads * head_dim):
    the projections' outputs (views with a unit last stride are fine); cos, sin (1, 1, head_dim); pos: a
    one-element int64 tensor on the GPU; k_cache, v_cache (1, kv_heads, capacity, head_dim) contiguous; span:
    the slots the launch covers (at least pos + 1)."""
    _, kv_heads, _, head_dim = k_cache.shape
    heads = q.shape[-1] // head_dim
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and q.stride(-1) == k.stride(-1) == 1
    head_stride = k_cache.stride(1)
    roped = torch.empty(heads * head_dim, dtype=q.dtype, device=q.device)
    _rope_store_kernel[(heads + kv_heads,)](q, k, v, cos.reshape(-1), sin.reshape(-1), pos, roped, k_cache,
                                            v_cache, head_stride, HEADS=heads, D=head_dim, num_warps=1)
    size = split_size(span)
    n_split = -(-span // size)
    m = torch.empty((heads, n_split), dtype=torch.float32, device=q.device)
    l_sum = torch.empty((heads, n_split), dtype=torch.float32, device=q.device)
    acc = torch.empty((heads, n_split, head_dim), dtype=torch.float32, device=q.device)
    _attend_split_kernel[(heads, n_split)](roped, k_cache, v_cache, pos, m, l_sum, acc, float(scale), head_stride,
                                           n_split, REP=heads // kv_heads, D=head_dim, SPLIT=size, BLOCK=BLOCK,
                                           num_warps=WARPS)
    out = torch.empty((1, 1, heads * head_dim), dtype=q.dtype, device=q.device)
    _combine_kernel[(heads,)](m, l_sum, acc, out, n_split, D=head_dim, SPLITS=MAX_SPLITS,
                              num_warps=4)
    return out


def reference(q, k, v, cos, sin, pos, k_cache, v_cache, scale):
    """What `attend` computes, with torch ops in fp32 (writes the caches the same way)."""
    _, kv_heads, _, head_dim = k_cache.shape
    p = int(pos)

    def rotate(x):
        x = x.float().view(-1, head_dim)
        half = head_dim // 2
        turned = torch.cat((-x[:, half:], x[:, :half]), dim=-1)
        return x * cos.float().view(1, -1) + turned * sin.float().view(1, -1)

    query = rotate(q).to(q.dtype)
    k_cache[0, :, p] = rotate(k).to(k_cache.dtype)
    v_cache[0, :, p] = v.view(kv_heads, head_dim)
    keys = k_cache[0, :, :p + 1].float().repeat_interleave(query.shape[0] // kv_heads, dim=0)
    values = v_cache[0, :, :p + 1].float().repeat_interleave(query.shape[0] // kv_heads, dim=0)
    o = F.scaled_dot_product_attention(query.float()[:, None], keys, values, scale=scale)
    return o.reshape(1, 1, -1).to(q.dtype)


_works = {}


def works(device, dtype, head_dim, heads, kv_heads):
    """Whether the kernels run here and agree with `reference` for this dtype and head layout: checked once per
    combination on small random inputs, at a short and a long position. Otherwise the decoder keeps its torch
    ops, with a note."""
    key = (str(device), dtype, head_dim, heads, kv_heads)
    if key in _works:
        return _works[key]
    problem = None
    if not AVAILABLE or torch.device(device).type != "cuda":
        problem = "no CUDA GPU with Triton"
    elif head_dim < 16 or head_dim & (head_dim - 1) or heads % kv_heads:
        problem = f"head size {head_dim} with {heads} heads over {kv_heads} key/value heads"
    else:
        problem = _self_check(device, dtype, head_dim, heads, kv_heads)
    if problem and AVAILABLE and torch.device(device).type == "cuda":
        print(f"note: the Triton decode-attention kernels are not used here ({problem}); using torch ops",
              file=sys.stderr, flush=True)
    _works[key] = problem is None
    return _works[key]


def _self_check(device, dtype, head_dim, heads, kv_heads):
    g = torch.Generator().manual_seed(0)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    try:
        with torch.cuda.device(device):
            for position, span in ((5, 64), (700, 1024)):
                shape = (1, kv_heads, span, head_dim)
                cache = [torch.randn(shape, generator=g).to(device, dtype) for _ in range(2)]
                copies = [c.clone() for c in cache]
                q = torch.randn(1, 1, heads * head_dim, generator=g).to(device, dtype)
                k, v = (torch.randn(1, 1, kv_heads * head_dim, generator=g).to(device, dtype) for _ in range(2))
                angle = torch.rand(head_dim // 2, generator=g) * 6
                cos, sin = (f(torch.cat((angle, angle))).view(1, 1, -1).to(device, dtype)
                            for f in (torch.cos, torch.sin))
                pos = torch.tensor([position], device=device)
                ours = attend(q, k, v, cos, sin, pos, cache[0], cache[1], span, head_dim ** -0.5)
                ref = reference(q, k, v, cos, sin, pos, copies[0], copies[1], head_dim ** -0.5)
                gap = (ours.float() - ref.float()).abs().max().item()
                if not (gap <= tolerance and torch.equal(cache[1], copies[1])
                        and torch.allclose(cache[0].float(), copies[0].float(), atol=tolerance, rtol=0)):
                    return f"its result differs from torch ops' by {gap:.2g} at position {position}"
    except Exception as e:  # a Triton or driver that cannot build or run them
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None
