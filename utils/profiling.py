"""`finetune.py --profile_steps A-B`: the PyTorch profiler over optimizer steps A to B of a real run, on every
process, so a slow run (one GPU, DDP, FSDP) can be looked at as it ran. Writes, per process, into
<output_dir>/profile/: rank<R>.json (a Chrome / Perfetto trace) and rank<R>.txt (the operators and kernels that
took the time, and how long the GPU sat idle between kernels)."""

import json
import os

import torch
from transformers import TrainerCallback


def parse_steps(text):
    """'A-B' (or 'A') -> (A, B) with 1 <= A <= B; ValueError with the reason otherwise."""
    parts = text.split("-")
    try:
        first, last = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (None, None)
    except ValueError:
        first = None
    if first is None or not 1 <= first <= last:
        raise ValueError(f"expected A-B with 1 <= A <= B (optimizer steps), got '{text}'")
    return first, last


def gpu_idle(prof, min_gap_us=100.0):
    """From a finished torch.profiler run: the span from the first to the last GPU kernel or copy, the time with
    none running, and the longest gaps with the kernels either side. None without GPU activity."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
    if not spans:
        return None
    gaps, end, last = [], spans[0][1], spans[0][2]
    for start, stop, name in spans[1:]:
        if start > end:
            gaps.append((start - end, last, name))
        if stop > end:
            end, last = stop, name
    span = end - spans[0][0]
    idle = sum(g for g, _, _ in gaps)
    long = sorted((g for g in gaps if g[0] >= min_gap_us), reverse=True)
    return {"span_ms": span / 1e3, "idle_ms": idle / 1e3, "idle_in_gaps_over_min_ms": sum(g for g, _, _ in long) / 1e3,
            "gaps_over_min": len(long), "longest": [(round(g / 1e3, 2), a[:50], b[:50]) for g, a, b in long[:8]]}


SKIP = ("/warnings.py", "profiling.py", "/torch/nn/modules/module.py")  # frames `where` leaves out by default


def where(frames, skip=SKIP, depth=3):
    """'file:line function <- ...' for the first `depth` of `frames` ((filename, line, name), innermost first)
    whose file path contains none of `skip`."""
    mine = [f for f in frames if not any(s in f[0] for s in skip)]
    return " <- ".join(f"{os.path.basename(file)}:{line} {name}" for file, line, name in mine[:depth])


class PeakMemory:
    """Records the CUDA caching allocator's history between start() and stop(); stop() returns the peak of
    allocated memory in that time and the largest groups of blocks alive at that moment, grouped by the Python
    frames that allocated them (only blocks allocated after start(); the rest counts in 'before_gib')."""

    def __init__(self, skip=SKIP):
        self.skip, self.base = skip, None

    def start(self):
        self.base = torch.cuda.memory_allocated()
        torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
        return self

    def stop(self, top=12):
        try:
            snapshot = torch.cuda.memory._snapshot()
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
        return peak_report(snapshot["device_traces"][torch.cuda.current_device()], self.base, top, self.skip)


def peak_report(trace, base=0, top=12, skip=SKIP):
    """From one device's allocator trace (torch.cuda.memory._snapshot()['device_traces'][i]): the peak of
    allocated bytes over the trace (plus `base`, what was allocated before it) and the groups of blocks alive
    at the peak, largest first, as (MiB, blocks, where)."""
    live, now, peak, at_peak = {}, 0, 0, {}
    for e in trace:
        if e["action"] == "alloc":
            live[e["addr"]] = e
            now += e["size"]
            if now > peak:
                peak, at_peak = now, dict(live)
        elif e["action"] in ("free_requested", "free") and e["addr"] in live:
            now -= live.pop(e["addr"])["size"]
    groups = {}
    for e in at_peak.values():
        frames = [(f["filename"], f["line"], f["name"]) for f in e.get("frames", [])]
        at = where(frames, skip)
        size, count = groups.get(at, (0, 0))
        groups[at] = (size + e["size"], count + 1)
    biggest = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    return {"before_gib": base / 2**30, "peak_gib": (base + peak) / 2**30,
            "alive_at_peak": [(round(s / 2**20, 1), n, w or "?") for w, (s, n) in biggest]}


class StepProfiler(TrainerCallback):
    """Profiles optimizer steps first..last (1-based) of this process and writes the report when they are done."""

    def __init__(self, first, last, folder, rank=0):
        self.first, self.last, self.folder, self.rank = first, last, folder, rank
        self.prof, self.written, self.memory = None, False, None

    def on_train_begin(self, args, state, control, **kwargs):
        from torch.profiler import ProfilerActivity, profile, schedule
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        done = state.global_step  # a resumed run starts counting from its checkpoint
        if self.last <= done:
            return
        # prof.step() runs at the end of every optimizer step: wait for the steps before `first`
        self.prof = profile(activities=activities, schedule=schedule(wait=max(0, self.first - 1 - done), warmup=0,
                                                                     active=self.last - max(self.first - 1, done),
                                                                     repeat=1),
                            on_trace_ready=self._write)
        self.prof.start()
        if self.first - 1 <= done:
            self._record_memory()

    def _record_memory(self):
        """On a GPU, what is alive at the memory peak of the profiled steps (for FSDP / ZeRO-3 runs above all)."""
        if torch.cuda.is_available() and self.memory is None:
            self.memory = PeakMemory().start()

    def on_step_end(self, args, state, control, **kwargs):
        if self.prof is not None and not self.written:
            if state.global_step == self.first - 1:
                self._record_memory()
            self.prof.step()

    def on_train_end(self, args, state, control, **kwargs):
        if self.prof is not None:
            self.prof.stop()  # writes the report if the run ended inside the window
            self.prof = None
        if self.memory is not None:  # the run ended before the window did: stop recording
            self.memory.stop()
            self.memory = None

    def _write(self, prof):
        if self.written:
            return
        self.written = True
        os.makedirs(self.folder, exist_ok=True)
        base = os.path.join(self.folder, f"rank{self.rank}")
        prof.export_chrome_trace(base + ".json")
        sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
        with open(base + ".txt", "w", encoding="utf-8") as f:
            f.write(f"optimizer steps {self.first}-{self.last}, process {self.rank}\n\n")
            f.write(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70) + "\n")
            f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15,
                                              max_name_column_width=70) + "\n")
            f.write("GPU idle between kernels: " + json.dumps(gpu_idle(prof)) + "\n")
            if self.memory is not None:
                report, self.memory = self.memory.stop(), None
                f.write(f"\nGPU memory: {report['before_gib']:.2f} GiB allocated before step {self.first}, peak "
                        f"{report['peak_gib']:.2f} GiB; allocated in these steps and alive at the peak (MiB, "
                        "blocks, allocated at):\n")
                f.writelines(f"  {mib:9.1f} {n:5d}  {at}\n" for mib, n, at in report["alive_at_peak"])
