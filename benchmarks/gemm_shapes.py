"""The GEMMs of one LoRA training step of a LLaMA layer, timed alone (CUDA events), in the variants the fused
layer could use: plain (beta = 0) or adding in place (beta = 1), the LoRA matrices' small GEMMs, and the base
GEMMs with extra columns appended to the input and the weight ([x | x A^T] [W | s B]^T, which computes the
adapter's term in the same GEMM, and g [W | s B], which also computes g B s in the backward pass). Figures and
what was concluded from them: BENCHMARKS.md.

    python benchmarks/gemm_shapes.py                      # LLaMA-2-7B shapes, 4,096 tokens, bf16, on the GPU
    python benchmarks/gemm_shapes.py --shape tiny --tokens 64 --iters 2    # smoke run (also on the CPU)

cuBLAS picks its kernel per shape, so a variant that only changes the shape can be faster or slower, and the
pick differed between machines: compare variants within one run.
"""

import argparse

import common  # first: it puts the project root on sys.path
import torch  # noqa: E402


def timer(device, iters):
    """us per call of fn, after warm-up: CUDA events on a GPU, wall time on the CPU."""
    import time

    def measure(fn):
        for _ in range(2):
            fn()
        if device.type != "cuda":
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            return (time.perf_counter() - start) / iters * 1e6
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        stop.record()
        torch.cuda.synchronize()
        return start.elapsed_time(stop) / iters * 1e3
    return measure


def projection_gemms(tokens, n_out, n_in, rank, tails, device, dtype, measure):
    """{variant: us} for one projection y = x W^T (W: n_out x n_in) with a rank-`rank` adapter."""
    def rnd(*shape):
        return torch.randn(*shape, device=device, dtype=dtype) * 0.02
    x, g, w = rnd(tokens, n_in), rnd(tokens, n_out), rnd(n_out, n_in)
    a, b, y, dx = rnd(rank, n_in), rnd(n_out, rank), rnd(tokens, n_out), rnd(tokens, n_in)
    xa, gb = rnd(tokens, rank), rnd(tokens, rank)
    res = {
        "fwd x W^T": measure(lambda: torch.mm(x, w.t())),
        "fwd y += x W^T (beta 1)": measure(lambda: y.addmm_(x, w.t())),
        "bwd g W": measure(lambda: torch.mm(g, w)),
        "bwd dx += g W (beta 1)": measure(lambda: dx.addmm_(g, w)),
        "lora x A^T": measure(lambda: x @ a.t()),
        "lora (x A^T) B^T": measure(lambda: xa @ b.t()),
        "lora g B": measure(lambda: g @ b),
        "lora dB = g^T (x A^T)": measure(lambda: g.t() @ xa),
        "lora dA = (g B)^T x": measure(lambda: gb.t() @ x),
        "lora dx += (g B) A": measure(lambda: dx.addmm_(gb, a)),
        "copy of y": measure(lambda: y.clone()),
    }
    for extra in tails:
        wide = torch.cat((w, rnd(n_out, extra)), dim=1)
        xw = torch.cat((x, rnd(tokens, extra)), dim=1)
        res[f"fwd [x | xa] [W | tail {extra}]^T"] = measure(lambda xw=xw, wide=wide: torch.mm(xw, wide.t()))
        res[f"bwd g [W | tail {extra}]"] = measure(lambda wide=wide: torch.mm(g, wide))
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_shape_args(p)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per step (batch x sequence)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--tails", default="16,32,48,64", help="widths of the appended columns to try")
    p.add_argument("--iters", type=int, default=40, help="timed calls per variant")
    args = p.parse_args(argv)
    config = common.llama_config(args)
    device = common.device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    measure = timer(device, args.iters)
    tails = [int(t) for t in args.tails.split(",") if t]
    h, m = config.hidden_size, config.intermediate_size
    per_layer = {}  # variant -> us per layer (q, k, v, o; gate, up; down)
    print(f"{device} {torch.cuda.get_device_name() if device.type == 'cuda' else ''}, torch {torch.__version__}, "
          f"{args.tokens} tokens, {dtype}")
    for name, n_out, n_in, count in (("q/k/v/o", h, h, 4), ("gate/up", m, h, 2), ("down", h, m, 1)):
        res = projection_gemms(args.tokens, n_out, n_in, args.rank, tails, device, dtype, measure)
        flops = 2 * args.tokens * n_out * n_in
        print(f"== {name}: {n_out} x {n_in}, {count} per layer")
        for variant, us in res.items():
            rate = f"  {flops / us / 1e6:6.0f} TFLOP/s" if not variant.startswith(("lora", "copy")) else ""
            print(f"  {variant:28s} {us:9.1f} us{rate}")
            per_layer[variant] = per_layer.get(variant, 0.0) + us * count
    print(f"== per layer, and for {config.num_hidden_layers} layers")
    for variant, us in per_layer.items():
        print(f"  {variant:28s} {us / 1e3:8.3f} ms {us * config.num_hidden_layers / 1e3:8.1f} ms")
    return per_layer


if __name__ == "__main__":
    main()
