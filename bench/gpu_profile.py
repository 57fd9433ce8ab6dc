"""Where one call's GPU time goes: the call runs under ``jax.profiler`` and the device
kernels of the trace it writes (Perfetto JSON) are summed by kernel name and by kind.

    from gpu_profile import profile_call
    report = profile_call(step, state, frozen, batch)   # after a warm-up call
    print(format_report(report))

Kinds: ``collective`` (NCCL kernels: all-gather, reduce-scatter, all-reduce, send/recv),
``attention`` (the Pallas and cuDNN attention kernels), ``matmul`` (cuBLAS / cuBLASLt and
XLA's Triton GEMMs), ``other`` (fusions, copies, reductions). Besides the summed kernel time of
each kind, the report gives the wall time of the call, the time the first GPU was busy at
all, and the part of that when only collectives ran (``collective_exposed_s``): the share of
the step that communication did not hide behind compute.
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
import tempfile
import time

_KINDS = (
    ("collective", ("nccl",)),
    ("attention", ("l2a_", "cudnn", "flash", "fmha", "attention")),
    ("matmul", ("gemm", "cublas", "cutlass", "sm90_xmma", "nvjet", "triton_gemm", "dot")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, marks in _KINDS:
        if any(m in low for m in marks):
            return kind
    return "other"


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def device_kernels(trace: dict) -> dict[str, list[tuple[str, float, float]]]:
    """GPU name -> its kernels (name, start us, end us), from a Perfetto JSON trace: the
    complete events on the stream threads of each ``/device:GPU:N`` process."""
    processes, threads = {}, {}
    for e in trace["traceEvents"]:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            processes[e["pid"]] = e["args"]["name"]
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e["tid"])] = e["args"]["name"]
    kernels = collections.defaultdict(list)
    for e in trace["traceEvents"]:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        process = processes.get(e["pid"], "")
        thread = threads.get((e["pid"], e["tid"]), "")
        if "/device:GPU" not in process or "stream" not in thread.lower():
            continue
        kernels[process.split()[0]].append((e["name"], e["ts"], e["ts"] + e["dur"]))
    return dict(kernels)


def summarize(trace: dict, wall_s: float) -> dict:
    """The report of ``profile_call`` for an already loaded trace."""
    kernels = device_kernels(trace)
    if not kernels:
        names = sorted(
            {str(e["args"].get("name")) for e in trace["traceEvents"] if e.get("ph") == "M"}
        )
        return {"wall_s": wall_s, "error": f"no GPU stream events; processes/threads {names[:30]}"}
    gpu = sorted(kernels)[0]
    events = kernels[gpu]
    by_name = collections.Counter()
    by_kind = collections.Counter()
    for name, start, stop in events:
        by_name[name] += (stop - start) / 1e6
        by_kind[kind_of(name)] += (stop - start) / 1e6
    spans = [(s, t) for _, s, t in events]
    compute = [(s, t) for n, s, t in events if kind_of(n) != "collective"]
    busy = _union_length(spans) / 1e6
    return {
        "gpu": gpu,
        "gpus_traced": len(kernels),
        "wall_s": wall_s,
        "busy_s": busy,
        "kernel_s": dict(by_kind),
        "collective_share": by_kind["collective"] / wall_s,
        "collective_exposed_s": busy - _union_length(compute) / 1e6,
        "top": [(n, s) for n, s in by_name.most_common(25)],
    }


def profile_call(fn, *args, keep: pathlib.Path | None = None) -> dict:
    """Runs ``fn(*args)`` once under the profiler (warm it up first: a compile would be in the
    trace) and returns the summary of its first GPU's kernels. ``keep``: a folder to copy the
    Perfetto trace into, for https://ui.perfetto.dev."""
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            wall = time.perf_counter() - start
        path = next(pathlib.Path(tmp).rglob("perfetto_trace.json.gz"))
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            (keep / path.name).write_bytes(path.read_bytes())
        with gzip.open(path, "rt") as f:
            trace = json.load(f)
    return summarize(trace, wall)


def format_report(report: dict, top: int = 12) -> str:
    """A few lines: wall and busy time, each kind's kernel time and share, the top kernels."""
    if "error" in report:
        return f"profile: {report['error']}"
    wall = report["wall_s"]
    lines = [
        f"profile of {report['gpu']} ({report['gpus_traced']} GPUs traced): wall {wall * 1e3:.1f}"
        f" ms, busy {report['busy_s'] * 1e3:.1f} ms, collectives not overlapped "
        f"{report['collective_exposed_s'] * 1e3:.1f} ms"
    ]
    for kind, seconds in sorted(report["kernel_s"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {kind:<11} {seconds * 1e3:9.1f} ms  {100 * seconds / wall:5.1f}% of wall")
    for name, seconds in report["top"][:top]:
        lines.append(f"    {seconds * 1e3:9.2f} ms  {name[:110]}")
    return "\n".join(lines)
