"""Where a profiled step's GPU time goes, from a Chrome trace (torch.profiler's export_chrome_trace, .json or
.json.gz), e.g. one written by `bench_train.py --profile --trace_dir DIR`:

    python benchmarks/trace_breakdown.py DIR/ours-ckpt-on.json.gz [--steps 2]

Prints the GPU time per kind of kernel (large GEMMs, small GEMMs, Triton kernels, attention, NF4
dequantization, copies, ...), the time no kernel ran, and which kernels the longest idle gaps follow. Kernels on
every stream count; time when two streams overlap counts once in the busy total. Where the trace has the CUDA
launch calls (torch.profiler records them): how far ahead of the GPU the CPU ran, and of the gaps between one
stream's kernels, how much the GPU waited for the CPU and how much it lost with the next kernel already queued.
A trace from `bench_train.py --profile --no-profile_cpu` slows the CPU least, so its gaps are the nearest to
an unprofiled step's.
"""

import argparse
import collections
import gzip
import json
import re

# first match wins; the name is the kernel's as CUDA reports it
KINDS = [
    ("memcpy DtoH", r"Memcpy DtoH|Memcpy Device -> Pinned|Memcpy Device -> Pageable"),
    ("memcpy HtoD", r"Memcpy HtoD|Memcpy Pinned -> Device|Memcpy Pageable -> Device"),
    ("memcpy DtoD", r"Memcpy DtoD|Memcpy Device -> Device"),
    ("memset", r"Memset"),
    ("attention", r"flash|fmha|attention|sdpa|cutlass.*Attention"),
    ("nf4 dequant", r"dequant|kDequantize|nf4"),
    ("optimizer", r"multi_tensor|adam|Adam"),
    ("nccl", r"nccl"),
    ("gemm", r"gemm|nvjet|cutlass|sm90_xmma|ampere_|cublas|Kernel2|splitKreduce"),
    ("triton", r"^triton_"),
    ("reduce (aten)", r"reduce_kernel|Reduce"),
    ("elementwise (aten)", r"elementwise|vectorized|unrolled|index|Cat|copy"),
]

LAUNCHES = ("cuda_runtime", "cuda_driver")  # the categories of the CPU's CUDA calls (kernel launches among them)


def load_events(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    return [e for e in trace["traceEvents"] if e.get("ph") == "X"
            and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") + LAUNCHES]


def launch_times(events):
    """{correlation id: CPU time of the CUDA call} for the launch calls in `events`."""
    return {e["args"]["correlation"]: e["ts"] for e in events
            if e.get("cat") in LAUNCHES and "correlation" in e.get("args", {})}


def lead(events):
    """How far ahead of the GPU the CPU ran: for each kernel, the time from its launch call on the CPU to its
    start on the GPU (matched by correlation id). Where that is near zero the GPU waits for the CPU; the
    smallest figures over a step are the slack that more CPU work per step would use up."""
    launches = launch_times(events)
    leads = sorted((e["ts"] - launches[e["args"]["correlation"]]) / 1e3 for e in events
                   if e.get("cat") == "kernel" and e.get("args", {}).get("correlation") in launches)
    if not leads:
        return
    pick = lambda q: leads[min(len(leads) - 1, int(q * len(leads)))]  # noqa: E731
    print(f"CPU lead over the GPU at kernel launch (ms): min {leads[0]:.2f}, 5% {pick(0.05):.2f}, "
          f"25% {pick(0.25):.2f}, median {pick(0.5):.2f}, max {leads[-1]:.2f} ({len(leads)} kernels)")


def gap_causes(events, steps=1):
    """Why the GPU stood still between consecutive kernels of one stream: the next kernel's launch call came
    after the previous kernel had finished (the GPU waited for the CPU), or it was already queued (the gap is
    the GPU's own start-up cost per kernel, or a wait on another stream). Per step, in ms, with the counts."""
    launches = launch_times(events)
    streams = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "kernel":
            streams[e.get("args", {}).get("stream")].append(e)
    late = queued = 0.0
    n_late = n_queued = 0
    small = 0.0  # queued gaps under 10 us: the per-kernel cost that fewer kernels would save
    for kernels in streams.values():
        kernels.sort(key=lambda e: e["ts"])
        for before, e in zip(kernels, kernels[1:]):
            gap = e["ts"] - (before["ts"] + before["dur"])
            if gap <= 0:
                continue
            launched = launches.get(e.get("args", {}).get("correlation"))
            if launched is not None and launched >= before["ts"] + before["dur"]:
                late, n_late = late + gap, n_late + 1
            else:
                queued, n_queued = queued + gap, n_queued + 1
                small += gap if gap < 10 else 0.0
    if n_late + n_queued == 0:
        return
    print(f"gaps within a stream, per step: the GPU waited for the CPU {late / 1e3 / steps:.1f} ms "
          f"({n_late / steps:.0f} gaps); the next kernel was already queued {queued / 1e3 / steps:.1f} ms "
          f"({n_queued / steps:.0f} gaps, {small / 1e3 / steps:.1f} ms of them under 10 us each)")


def kind(name, dur_us, big_gemm_us):
    for label, pattern in KINDS:
        if re.search(pattern, name, flags=re.I):
            if label == "gemm":
                return "gemm, large" if dur_us >= big_gemm_us else "gemm, small"
            return label
    return "other"


def breakdown(events, steps=1, big_gemm_us=100.0, top=12):
    """Per-step figures: busy/idle/span, time per kind, the largest Triton kernels, and the gaps."""
    events = sorted(events, key=lambda e: e["ts"])
    per_kind = collections.Counter()
    count = collections.Counter()
    names = collections.Counter()
    for e in events:
        k = kind(e["name"], e["dur"], big_gemm_us)
        per_kind[k] += e["dur"]
        count[k] += 1
        names[(k, e["name"][:90])] += e["dur"]
    # busy time as the union of kernel intervals, gaps between them with the kernel before each
    busy, gaps, end, last = 0.0, [], None, None
    for e in events:
        start, stop = e["ts"], e["ts"] + e["dur"]
        if end is None:
            busy, end, last = e["dur"], stop, e
            continue
        if start > end:
            gaps.append((start - end, last, e))
            busy += e["dur"]
        elif stop > end:
            busy += stop - end
        if stop > end:
            end, last = stop, e
    span = end - events[0]["ts"]
    idle = sum(g for g, _, _ in gaps)
    gap_after = collections.Counter()
    for g, before, _ in gaps:
        if g >= 20:
            gap_after[kind(before["name"], before["dur"], big_gemm_us) + " | " + before["name"][:60]] += g
    ms = lambda us: us / 1e3 / steps  # noqa: E731
    print(f"per step: span {ms(span):.1f} ms, GPU busy {ms(busy):.1f} ms, idle {ms(idle):.1f} ms "
          f"({sum(1 for g, _, _ in gaps if g >= 20) / steps:.0f} gap(s) of 20 us or more, "
          f"{ms(sum(g for g, _, _ in gaps if g >= 20)):.1f} ms in them)")
    print(f"{'kind':22s} {'ms/step':>9s} {'kernels/step':>13s}  (kernel time; overlapping streams add up here)")
    for k, us in per_kind.most_common():
        print(f"{k:22s} {ms(us):9.1f} {count[k] / steps:13.0f}")
    print("\nlargest single kernels by total time:")
    for (k, name), us in names.most_common(top):
        print(f"  {ms(us):7.1f} ms  [{k}] {name}")
    print("\nidle time (gaps of 20 us or more) by the kernel before the gap:")
    for what, us in gap_after.most_common(top):
        print(f"  {ms(us):7.1f} ms  {what}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", help="Chrome trace (.json or .json.gz)")
    p.add_argument("--steps", type=int, default=2, help="steps the trace holds (figures are per step)")
    p.add_argument("--big_gemm_us", type=float, default=100.0, help="GEMMs at least this long count as large")
    args = p.parse_args()
    events = load_events(args.trace)
    breakdown([e for e in events if e.get("cat") not in LAUNCHES], args.steps, args.big_gemm_us)
    lead(events)
    gap_causes(events, args.steps)


if __name__ == "__main__":
    main()
