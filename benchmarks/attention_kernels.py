"""sdpa's attention kernels on one layer's attention, forward + backward, timed two ways: the GPU time per call
(CUDA events) and the CPU time per call (the time to enqueue it while the GPU is held busy, so the CPU never
waits). A kernel that is faster on the GPU can still slow a step whose CPU side sets the pace. Figures and
what was concluded from them: BENCHMARKS.md.

    python benchmarks/attention_kernels.py                       # (8, 32, 512, 128), causal, bf16, on the GPU
    python benchmarks/attention_kernels.py --batch 1 --seq 4096  # one packed-size row
"""

import argparse
import time

import common  # noqa: F401  (first: it puts the project root on sys.path)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def step_fn(backend, compiled):
    def attend(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    fn = torch.compile(attend, fullgraph=True) if compiled else attend

    def step(q, k, v, g):
        out = fn(q, k, v)
        out.backward(g)
        return out
    return step


def gpu_ms(step, args, iters):
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step(*args)
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / iters


def cpu_us(step, args, iters):
    torch.cuda._sleep(int(2e9))  # ~1 s of GPU spinning: everything below only queues up behind it
    begin = time.perf_counter()
    for _ in range(iters):
        step(*args)
    spent = time.perf_counter() - begin
    torch.cuda.synchronize()
    return spent / iters * 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=50)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: attention_kernels.py times CUDA kernels; no CUDA GPU here")
    g = torch.Generator("cuda").manual_seed(0)
    shape = (args.batch, args.heads, args.seq, args.head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_() for _ in "qkv")
    grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    flops = 4 * args.batch * args.heads * args.seq ** 2 * args.head_dim / 2 * 3.5  # causal; backward ~2.5x forward
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, shape {shape}, causal, bf16, forward + backward")
    print(f"{'kernel':10s} {'mode':8s} {'GPU ms':>8s} {'TFLOP/s':>8s} {'CPU us':>8s} {'max err':>9s}")
    for name, backend in BACKENDS.items():
        for compiled in (False, True):
            step = step_fn(backend, compiled)
            try:
                out = step(q, k, v, grad)
            except RuntimeError as e:
                print(f"{name:10s} {'compiled' if compiled else 'eager':8s} unavailable: {str(e).splitlines()[0]}")
                continue
            err = (out.float() - ref).abs().max().item()
            for _ in range(3):
                step(q, k, v, grad)
            ms = gpu_ms(step, (q, k, v, grad), args.iters)
            us = cpu_us(step, (q, k, v, grad), min(args.iters, 40))
            print(f"{name:10s} {'compiled' if compiled else 'eager':8s} {ms:8.3f} {flops / ms / 1e9:8.0f} "
                  f"{us:8.0f} {err:9.2e}")
            q.grad = k.grad = v.grad = None


if __name__ == "__main__":
    main()
