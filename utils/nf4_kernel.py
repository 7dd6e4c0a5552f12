"""NF4 dequantization as one hand-written Triton kernel (CUDA only), for the compiled decoder layer.

bitsandbytes' packed 4-bit layout: two codes per byte, the first in the high nibble; value = code[q] x absmax of
its block of `blocksize` values, in fp32, rounded to the output dtype. With double quantization absmax is
itself uint8 codes x fp32 scales per `blocksize2` absmax values, plus an offset. The torch-op version
(utils/fused_layer.py: dequantize_nf4) compiles into a kernel that computes each output value on its own:
~29 us for a 4096 x 11008 weight in a 7B training step on an H200 (~2.5 TB/s). Here each program reads a run of
bytes once, computes both values of every byte and writes them interleaved: ~22.5 us in the same step
(BENCHMARKS.md). `dequantize` is a torch.library.triton_op, so torch.compile calls the kernel from inside the
compiled layer (no graph break, no Python launcher per call). Bit for bit bitsandbytes' result
(tests/test_speed_gpu.py)."""

import importlib.util
import sys

import torch

BYTES_PER_PROGRAM = 2048  # each program writes twice as many values


def _importable():
    """A CUDA GPU, Triton with tl.join and libdevice (3.0+), and torch.library.triton_op (torch 2.6+)."""
    if not torch.cuda.is_available() or importlib.util.find_spec("triton") is None \
            or not hasattr(torch.library, "triton_op") or not hasattr(torch.library, "wrap_triton"):
        return False
    try:
        import triton.language as tl
        from triton.language.extra import libdevice  # noqa: F401
    except ImportError:
        return False
    return hasattr(tl, "join")


AVAILABLE = _importable()

if AVAILABLE:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
    from triton.language.extra import libdevice

    @triton.jit
    def _dequantize_nf4_kernel(packed, absmax, code, absmax2, code2, offset, out, n_bytes, n_values,
                               HALF_BLOCK: tl.constexpr, BLOCK2: tl.constexpr, NESTED: tl.constexpr,
                               BYTES: tl.constexpr):
        start = tl.program_id(0).to(tl.int64) * BYTES
        idx = start + tl.arange(0, BYTES)
        inside = idx < n_bytes
        byte = tl.load(packed + idx, mask=inside, other=0).to(tl.int32)
        high = tl.load(code + (byte >> 4))
        low = tl.load(code + (byte & 15))
        block = idx // HALF_BLOCK  # the absmax block of both values of this byte
        if NESTED:
            q = tl.load(absmax + block, mask=inside, other=0).to(tl.int32)
            # rounded product, then the sum, as bitsandbytes computes it (no fused multiply-add)
            scale = libdevice.mul_rn(tl.load(code2 + q), tl.load(absmax2 + block // BLOCK2, mask=inside, other=0.0)) \
                + tl.load(offset)
        else:
            scale = tl.load(absmax + block, mask=inside, other=0.0)
        values = tl.join(high * scale, low * scale).to(out.dtype.element_ty)  # (BYTES, 2): high first
        values = tl.reshape(values, (2 * BYTES,))
        where = 2 * start + tl.arange(0, 2 * BYTES)
        tl.store(out + where, values, mask=where < n_values)

    @triton_op("llama_qlora::dequantize_nf4", mutates_args=())
    def _dequantize(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, absmax2: torch.Tensor,
                    code2: torch.Tensor, offset: torch.Tensor, nested: bool, blocksize: int, blocksize2: int,
                    n_values: int, dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(n_values, dtype=dtype, device=packed.device)
        n_bytes = packed.numel()
        grid = (triton.cdiv(n_bytes, BYTES_PER_PROGRAM),)
        wrap_triton(_dequantize_nf4_kernel)[grid](packed, absmax, code, absmax2, code2, offset, out, n_bytes,
                                                  n_values, HALF_BLOCK=blocksize // 2, BLOCK2=blocksize2,
                                                  NESTED=nested, BYTES=BYTES_PER_PROGRAM, num_warps=8)
        return out


def dequantize(w, absmax, code, blocksize, shape, dtype, absmax2=None, code2=None, offset=None, blocksize2=None):
    """The same arguments and result as utils/fused_layer.py: dequantize_nf4, on a CUDA GPU with Triton."""
    n = 1
    for s in shape:
        n *= s
    nested = absmax2 is not None
    if not nested:  # the kernel's unused pointers: any tensor on the device
        absmax2 = code2 = offset = absmax
    elif not torch.is_tensor(offset):
        offset = torch.tensor(float(offset), device=w.device)
    args = (w.view(-1), absmax.view(-1), code, absmax2.view(-1), code2, offset, nested, blocksize, blocksize2 or 1,
            n, dtype)
    if torch.compiler.is_compiling() or w.device.type != "cuda" \
            or w.device.index in (None, torch.cuda.current_device()):
        out = _dequantize(*args)  # (compiled code selects the tensors' GPU itself)
    else:  # an eager call for tensors on another GPU: Triton launches on the current one
        with torch.cuda.device(w.device):
            out = _dequantize(*args)
    return out.view(shape)


_works = None


def works():
    """Whether the kernel runs on this GPU and computes what the torch ops compute: checked once, eagerly, on a
    small weight, so that an unusual GPU or Triton build keeps the torch ops (with a note) instead of failing in
    the middle of training. While torch.compile traces, only an earlier check counts."""
    global _works
    if _works is None and AVAILABLE and not torch.compiler.is_compiling():
        _works = self_check("cuda")
    return bool(_works)


def self_check(device):
    """dequantize() against utils/fused_layer.py: dequantize_nf4 (eager torch ops, bit for bit bitsandbytes'
    result) on random codes, with and without double quantization."""
    from utils.fused_layer import dequantize_nf4
    g = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (96,), dtype=torch.uint8, generator=g).to(device)  # 192 values: 3 blocks
    code, code2 = torch.randn(16, generator=g).to(device), torch.randn(256, generator=g).to(device)
    absmax = torch.rand(3, generator=g).to(device)
    absmax_codes = torch.randint(0, 256, (3,), dtype=torch.uint8, generator=g).to(device)
    absmax2, offset = torch.rand(1, generator=g).to(device), torch.tensor(0.25, device=device)
    cases = ((packed, absmax, code, 64, [12, 16], torch.bfloat16),
             (packed, absmax_codes, code, 64, [12, 16], torch.bfloat16, absmax2, code2, offset, 256))
    try:
        same = all(torch.equal(dequantize(*case), dequantize_nf4(*case)) for case in cases)
        problem = None if same else "its result differs from the torch ops'"
    except Exception as e:  # a Triton or driver that cannot build or run it
        problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if problem:
        print(f"note: the Triton NF4 kernel is not used here ({problem}); dequantizing with torch ops",
              file=sys.stderr, flush=True)
    return problem is None
