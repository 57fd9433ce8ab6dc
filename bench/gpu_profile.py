"""Where one call's GPU time goes: the call runs under ``jax.profiler`` and the device
kernels of the trace it writes (Perfetto JSON) are summed by kernel name and by kind.

    from gpu_profile import profile_call
    report = profile_call(step, state, frozen, batch)   # after a warm-up call
    print(format_report(report))

Kernels are also summed by operation: the ``jax.named_scope`` (``SCOPES``: the model's
projections, attention branches, router, MLP, the head and loss, the optimizer) in the name
stack the trace records for each kernel, forward and backward apart.

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
import os
import pathlib
import tempfile
import time

_KINDS = (
    ("collective", ("nccl",)),
    ("attention", ("l2a_", "cudnn", "flash", "fmha", "attention")),
    ("matmul", ("gemm", "cublas", "cutlass", "sm90_xmma", "nvjet", "triton_gemm", "dot")),
)


# the model's and the train step's ``jax.named_scope`` names, most specific first
SCOPES = (
    "window_qkv_proj",
    "window_attention",
    "window_out_proj",
    "global_qkv_proj",
    "global_attention",
    "global_out_proj",
    "router",
    "qkv_proj",
    "attention",
    "out_proj",
    "mlp",
    "embed",
    "head_and_loss",
    "optimizer",
)


def scope_of(args: dict) -> tuple[str, str]:
    """(scope, phase) of a kernel from its trace event's arguments: the first of ``SCOPES``
    in the op's name stack (``unscoped`` if none, ``unknown`` without a name stack: copies,
    memsets, kernels of a command buffer), and
    ``backward`` when the op comes from a transpose (JAX's name for the backward pass) or
    ``forward``."""
    stack = " ".join(
        str(args[k]) for k in ("name", "long_name", "scope") if isinstance(args.get(k), str)
    )
    if not stack:
        return "unknown", "forward"
    phase = "backward" if "transpose(" in stack else "forward"
    parts = stack.replace("(", "/").replace(")", "/").split("/")
    for scope in SCOPES:
        if scope in parts:
            return scope, phase
    return "unscoped", phase


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


def device_kernels(trace: dict) -> dict[str, list[tuple[str, float, float, dict]]]:
    """GPU name -> its kernels (name, start us, end us, event arguments), from a Perfetto JSON
    trace: the complete events on the stream threads of each ``/device:GPU:N`` process."""
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
        kernels[process.split()[0]].append(
            (e["name"], e["ts"], e["ts"] + e["dur"], e.get("args") or {})
        )
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
    by_scope = collections.defaultdict(lambda: {"forward": 0.0, "backward": 0.0})
    for name, start, stop, args in events:
        by_name[name] += (stop - start) / 1e6
        by_kind[kind_of(name)] += (stop - start) / 1e6
        scope, phase = scope_of(args)
        by_scope[scope][phase] += (stop - start) / 1e6
    spans = [(s, t) for _, s, t, _ in events]
    compute = [(s, t) for n, s, t, _ in events if kind_of(n) != "collective"]
    examples = {}  # one kernel's arguments per scope: what the attribution read
    per_scope = collections.defaultdict(collections.Counter)  # scope -> (kernel, op) -> s
    for name, start, stop, args in events:
        scope = scope_of(args)[0]
        examples.setdefault(scope, {"kernel": name, **args})
        op = str(args.get("name") or args.get("hlo_op") or "")
        per_scope[scope][(name, op[-160:])] += (stop - start) / 1e6
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
        "scope_s": {k: dict(v) for k, v in by_scope.items()},
        "scope_examples": {k: {a: str(b)[:300] for a, b in v.items()} for k, v in examples.items()},
        "scope_top": {
            k: [(kernel, op, t) for (kernel, op), t in v.most_common(6)]
            for k, v in per_scope.items()
        },
    }


def without_command_buffers() -> None:
    """Turns XLA's command buffers (CUDA graphs) off for this process; call before JAX starts
    its GPU backend. Kernels launched from a command buffer carry no name stack in the trace,
    so without them every kernel can be attributed to its named scope."""
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_enable_command_buffer=".strip()


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
    scopes = report.get("scope_s", {})
    if set(scopes) - {"unknown"}:
        lines.append("  by operation (named scope): forward / backward ms")
        for scope, t in sorted(scopes.items(), key=lambda kv: -sum(kv[1].values())):
            lines.append(
                f"    {scope:<16} {t['forward'] * 1e3:8.1f} / {t['backward'] * 1e3:8.1f}"
                f"  {100 * sum(t.values()) / wall:5.1f}% of wall"
            )
    for name, seconds in report["top"][:top]:
        lines.append(f"    {seconds * 1e3:9.2f} ms  {name[:110]}")
    return "\n".join(lines)
