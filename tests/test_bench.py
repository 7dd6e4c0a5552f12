"""The benchmarks run at a tiny shape on the CPU (in-process, one training step each) and print sane numbers;
on CPU the project's decoder reproduces generate() token for token."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

TINY = ["--shape", "tiny", "--hidden_size", "32", "--intermediate_size", "64", "--vocab_size", "200"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import bench_train
    import common
    folder = str(tmp_path_factory.mktemp("bench-ckpt"))
    common.build_checkpoint(folder, common.llama_config(bench_train.parse_args(TINY)))
    return folder


def test_train_benchmark_workers_report_throughput_and_the_same_losses(checkpoint, capsys):
    import json

    import bench_train
    results = []
    for stack in ("plain", "ours"):
        args = bench_train.parse_args(TINY + ["--steps", "1", "--warmup", "1", "--batch", "2", "--seq", "32",
                                              "--ckpt", "on", "--plain_dropouts", "0.05", "--loss_steps", "3",
                                              "--worker", stack, "--workdir", checkpoint])
        bench_train.main(args, [])
        mine = [json.loads(line[7:]) for line in capsys.readouterr().out.splitlines() if line.startswith("RESULT ")]
        assert [r["data"] for r in mine] == ["fixed", "losses", "real"]
        for r in mine[::2]:
            assert r["stack"] == stack and r["tokens_per_s"] > 0 and r["steps"] == 1 and r["ckpt"] is True
        assert 0 < mine[2]["lengths"]["mean"] <= 32
        results += mine
    plain, ours = (r["losses"] for r in results if r["data"] == "losses")
    assert len(plain) == len(ours) == 3 and plain[-1] < plain[0]  # it trains
    assert ours == pytest.approx(plain, rel=1e-3)  # same init, same batches: the same curve
    table = bench_train.table(results, args)
    assert "| ours | 2x32 random | on |" in table and "| plain | 2x32 random | on | 0.05 |" in table
    assert "Loss check (3 steps" in table


def test_decode_benchmark_matches_generate_on_cpu():
    import bench_decode
    results = bench_decode.main(bench_decode.parse_args(
        TINY + ["--turns", "2", "--max_new_tokens", "6", "--baseline_tokens", "6", "--verify_tokens", "6",
                "--message_words", "3,9"]))
    assert results["generate"]["tokens_per_s"] > 0 and results["generate"]["ttft_s"] > 0
    assert [t["new_tokens"] for t in results["stream"]] == [6, 6]
    assert results["stream"][1]["reused_tokens"] > 0 and results["stream"][1]["sampled"]
    check = results["greedy_check"]
    assert check["identical_prefix"] == check["compared"] == 6 and check["max_logit_deficit"] == 0


def test_decode_benchmark_loads_a_qlora_base_with_an_adapter(tmp_path):
    """--bits 4 --lora_r: the checkpoint saved, loaded in NF4 by utils/modeling.py with a random adapter on every
    linear layer, and decoded through the project's path with generate's greedy tokens."""
    import bench_decode
    # layers at least one 64-value quantization block wide: on CPUs with AVX512-BF16, bitsandbytes 0.50 repacks 4-bit
    # weights for inference and cannot repack a layer with fewer inputs than its block size (TINY's 32)
    results = bench_decode.main(bench_decode.parse_args(
        TINY + ["--hidden_size", "64", "--intermediate_size", "128", "--turns", "2", "--max_new_tokens", "6",
                "--baseline_tokens", "6", "--verify_tokens", "6", "--message_words", "3,9", "--bits", "4",
                "--lora_r", "4", "--workdir", str(tmp_path)]))
    assert os.path.isfile(os.path.join(tmp_path, "decode-2x64", "model.safetensors"))
    assert [t["new_tokens"] for t in results["stream"]] == [6, 6]
    check = results["greedy_check"]
    assert check["identical_prefix"] == check["compared"] == 6 and check["max_logit_deficit"] == 0


def test_gemm_shapes_times_every_variant(capsys):
    """benchmarks/gemm_shapes.py at a tiny shape on the CPU: every variant is timed for every projection, and
    the per-layer sums weigh q/k/v/o four times, gate/up twice and down once."""
    import gemm_shapes
    per_layer = gemm_shapes.main(TINY + ["--tokens", "16", "--iters", "1", "--tails", "16"])
    out = capsys.readouterr().out
    assert out.count("== ") == 4 and "bwd g [W | tail 16]" in out and "fwd [x | xa] [W | tail 16]^T" in out
    assert len(per_layer) == 13 and all(us > 0 for us in per_layer.values())


def test_multi_gpu_comparison_records_the_targets():
    import multi_gpu
    def run(tokens_per_s, peak, losses):
        return {"tokens_seen": 4096, "tokens_per_second_after_first_step": tokens_per_s * 0.9,
                "tokens_per_second_second_half": tokens_per_s, "peak_gpu_memory_gib": peak,
                "loss_history": [[i + 1, loss] for i, loss in enumerate(losses)]}
    results = {"single": run(1000.0, 10.0, [11.2, 11.1]), "ddp": run(1900.0, 9.0, [11.2, 11.1]),
               "fsdp": run(700.0, 6.5, [11.2, 11.12]), "single_plain": run(600.0, 11.0, [11.2, 11.1])}
    results["ddp"]["tokens_seen"] = 8192  # two processes, one micro-batch each per step
    c = multi_gpu.comparison(results)
    assert c["ddp_speedup"] == 1.9 and c["ddp_speedup_met"] is True and c["ddp_tokens_over_single_tokens"] == 2
    results["ddp"]["tokens_per_second_after_first_step"] = 1500.0  # slower first steps count only in this ratio
    assert multi_gpu.comparison(results)["ddp_speedup_after_first_step"] == round(1500 / 900, 3)
    assert c["fsdp_peak_over_single_peak"] == 0.65 and c["fsdp_peak_over_single_peak_met"] is False
    assert c["fsdp_peak_over_single_plain_peak"] == 0.591 and c["fsdp_peak_over_single_plain_peak_met"] is True
    assert c["max_loss_diff_ddp_fsdp"] == pytest.approx(0.02) and c["max_loss_diff_ddp_fsdp_met"] is False
    assert "max_loss_diff_single_ddp" not in c and "max_loss_diff_ddp_zero3" not in c
    assert multi_gpu.comparison({"single": results["single"]}) == {}


def test_trace_breakdown_sorts_kernels_and_finds_idle_time(tmp_path, capsys):
    """benchmarks/trace_breakdown.py on a small hand-made trace: time per kind of kernel, overlapping streams
    counted once in the busy time, and the idle gaps named by the kernel before them."""
    import gzip
    import json

    import trace_breakdown
    kernels = [  # (name, start us, duration us, category): one step
        ("nvjet_sm90_tst_256x128_gemm", 0, 500, "kernel"),
        ("Memcpy DtoH (Device -> Pinned)", 100, 300, "gpu_memcpy"),  # on a side stream, overlapping the GEMM
        ("triton_poi_fused_mul_0", 600, 50, "kernel"),  # 100 us after the GEMM ends: a gap
        ("_dequantize_nf4_kernel", 650, 30, "kernel"),
        ("pytorch_flash::flash_fwd_kernel", 700, 80, "kernel"),  # 20 us gap
        ("nvjet_sm90_tst_64x32_splitK", 780, 20, "kernel"),  # a short GEMM
    ]
    events = [{"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur} for name, ts, dur, cat in kernels]
    events.append({"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 900})  # not GPU work
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    loaded = trace_breakdown.load_events(str(path))
    assert len(loaded) == len(kernels)
    trace_breakdown.breakdown(loaded, steps=1)
    out = capsys.readouterr().out
    # span 800 us, busy 680 us (the copy inside the GEMM counts once), idle 120 us in two gaps
    assert "span 0.8 ms, GPU busy 0.7 ms, idle 0.1 ms (2 gap(s) of 20 us or more" in out
    rows = {line[:22].strip(): line[22:].split() for line in out.splitlines()[2:] if line[:1].isalpha()}
    assert rows["gemm, large"] == ["0.5", "1"] and rows["memcpy DtoH"] == ["0.3", "1"]  # ms, kernels
    assert all(rows[k][1] == "1" for k in ("gemm, small", "nf4 dequant", "attention", "triton"))
    assert "0.1 ms  gemm, large | nvjet_sm90_tst_256x128_gemm" in out  # the 100 us gap follows the large GEMM
    assert "0.0 ms  nf4 dequant | _dequantize_nf4_kernel" in out  # the 20 us one the dequantization


def test_trace_breakdown_tells_gaps_the_cpu_caused_from_queued_ones(capsys):
    """trace_breakdown.gap_causes: a gap after which the next kernel was launched only once the GPU had
    finished (the GPU waited for the CPU) counts apart from one whose kernel was already queued; streams apart."""
    import trace_breakdown

    def kernel(corr, ts, dur, stream=7):
        return {"cat": "kernel", "name": f"k{corr}", "ts": ts, "dur": dur, "args": {"correlation": corr,
                                                                                  "stream": stream}}

    def launch(corr, ts):
        return {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 1, "args": {"correlation": corr}}

    events = [launch(1, 0), kernel(1, 5, 10),  # ends at 15
              launch(2, 2), kernel(2, 18, 10),  # queued at 2: a 3 us gap the GPU made itself; ends at 28
              launch(3, 40), kernel(3, 45, 10),  # launched at 40, after k2 ended: 17 us waiting for the CPU
              launch(4, 41), kernel(4, 100, 5, stream=9)]  # alone on its stream: no gap
    trace_breakdown.gap_causes(events, steps=1)
    out = capsys.readouterr().out
    assert "the GPU waited for the CPU 0.0 ms (1 gaps)" in out
    assert "already queued 0.0 ms (1 gaps, 0.0 ms of them under 10 us each)" in out
    capsys.readouterr()
    trace_breakdown.gap_causes([dict(e, ts=e["ts"] * 1000, dur=e["dur"] * 1000) for e in events], steps=1)
    out = capsys.readouterr().out  # the same trace with times x 1000: 17 ms late, 3 ms queued (not under 10 us)
    assert "waited for the CPU 17.0 ms (1 gaps)" in out and "already queued 3.0 ms (1 gaps, 0.0 ms" in out


def test_train_profile_without_cpu_ops_still_runs_without_a_gpu(capsys):
    """bench_train --no-profile_cpu records only GPU activity; on a machine without a GPU (this one, in CI)
    that would be nothing, so the CPU ops are recorded as with the default."""
    import bench_train
    import torch
    assert bench_train.parse_args(["--no-profile_cpu"]).profile_cpu is False
    assert bench_train.parse_args([]).profile_cpu is True
    bench_train.profile(lambda batch: torch.ones(64).mul(batch).sum().item(), 2.0, "tiny", cpu=False)
    out = capsys.readouterr().out
    assert "=== profile: tiny (2 steps) ===" in out and "aten::mul" in out


def test_train_benchmark_flags_compiling_inside_the_timed_steps():
    """A step that compiles something new after the warm-up (here: a new shape at every step, with dynamic
    shapes off) is counted, and the table says that figure includes compile time."""
    import bench_train
    import torch
    args = bench_train.parse_args(TINY + ["--warmup", "1"])
    double = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
    torch._dynamo.reset()

    def step(n):
        double(torch.ones(n))
        return n

    steady = bench_train.timed(step, [5, 5, 5], args)
    changing = bench_train.timed(step, [6, 7, 8], args)
    torch._dynamo.reset()
    assert steady["compiled_while_timed"] == 0 and changing["compiled_while_timed"] == 2
    rows = [dict(stack="ours", data="real", ckpt=True, dropout=0.0, **changing),
            dict(stack="ours", data="fixed", ckpt=True, dropout=0.0, **steady)]
    table = bench_train.table(rows, args)
    assert "warning: ours (real data, checkpointing on) compiled 2 graph(s)" in table
    assert "fixed data" not in table
