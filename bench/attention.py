"""Attention kernels on one GPU: correctness first, then forward and forward+backward timings
of the window kernel, the conditional global kernel and both together (the L2A layer), against
cuDNN dense causal attention in the same run on the same card. cuDNN's own sliding-window
attention is timed too, over the same keys as the window kernel.

    python bench/attention.py --out results/        # full table (T = 8K, 32K, 128K)
    python bench/attention.py --seq-lens 8192 --densities 0.2 --reps 5
    python bench/attention.py --tune               # pick tiles at T=32K first, then the table

FLOPs are counted on the work actually done: 4 * B * H * D per visible (query, key) pair for
the forward (2 * B * H * T^2 * D for dense causal), 3.5x that for forward+backward. Times are
device time per call: calls are launched back to back and the host waits once per round
(``median_ms``), for cuDNN and for our kernels alike.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from pallas_kernels import (  # noqa: E402
    AttentionBlocks,
    BlockConfig,
    conditional_global_attention,
    conditional_global_attention_reference,
    sliding_window_attention,
    sliding_window_attention_reference,
)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.2, 0.5])
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--check-len", type=int, default=4096, help="length of the correctness check")
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--tune", action="store_true", help="sweep tile configs before the table")
    p.add_argument("--tune-len", type=int, default=32768)
    p.add_argument("--out", type=pathlib.Path, default=None, help="folder for JSON + markdown")
    return p.parse_args()


def median_ms(fn, *args, reps: int, target_ms: float = 50.0) -> float:
    """Device milliseconds per call: the median over ``reps`` rounds, each launching enough
    calls back to back to keep the GPU busy for about ``target_ms`` and waiting once at the end.
    So the host's per-call dispatch (0.1-0.3 ms for one jitted call here) is not counted: in a
    training step the attention ops are queued behind each other the same way."""
    jax.block_until_ready(fn(*args))  # compile and warm up
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    calls = max(2, int(target_ms / ((time.perf_counter() - start) * 1e3)))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) * 1e3 / calls)
    return statistics.median(times)


def warm_up_gpu(seconds: float = 2.0) -> None:
    """Runs matmuls for a while so clocks are up before the first timing."""
    a = jax.random.normal(jax.random.key(6), (8192, 8192), jnp.bfloat16)
    matmul = jax.jit(lambda a: a @ a)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        jax.block_until_ready(matmul(a))


def random_route(key, seq_len: int, density: float) -> jax.Array:
    """Exactly round(density * T) tokens routed, at random positions."""
    count = round(density * seq_len)
    chosen = jax.random.permutation(key, seq_len)[:count]
    return jnp.zeros((1, seq_len), bool).at[0, chosen].set(True)


def qkv(key, seq_len, args, dtype=jnp.bfloat16):
    kq, kk, kv = jax.random.split(key, 3)
    shape_q = (1, seq_len, args.heads, args.head_dim)
    shape_kv = (1, seq_len, args.kv_heads, args.head_dim)
    return (
        jax.random.normal(kq, shape_q, dtype),
        jax.random.normal(kk, shape_kv, dtype),
        jax.random.normal(kv, shape_kv, dtype),
    )


def cudnn_causal(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def cudnn_window(window):
    """cuDNN's own sliding-window attention over the same keys as ours (i - window < j <= i)."""

    def run(q, k, v):
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=True, local_window_size=(window - 1, 0), implementation="cudnn"
        )

    return run


def fwd_bwd(fn):
    """One jitted forward + backward: the VJP of cotangent ``do`` for every float input
    (integer and boolean inputs, such as the route, are passed through)."""

    def run(*inputs_and_do):
        *inputs, do = inputs_and_do
        diff = [i for i, x in enumerate(inputs) if jnp.issubdtype(x.dtype, jnp.floating)]

        def of_floats(*floats):
            full = list(inputs)
            for i, x in zip(diff, floats, strict=True):
                full[i] = x
            return fn(*full)

        out, vjp = jax.vjp(of_floats, *(inputs[i] for i in diff))
        return out, vjp(do)

    return jax.jit(run)


def rel_err(got, want) -> float:
    got = np.asarray(got, np.float32)
    want = np.asarray(want, np.float32)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def check(args) -> list[dict]:
    """Relative errors of our kernels against the f32 jnp reference and against cuDNN."""
    t = args.check_len
    key = jax.random.key(1)
    q, k, v = qkv(key, t, args)
    do = jax.random.normal(jax.random.key(2), q.shape, q.dtype)
    route = random_route(jax.random.key(3), t, 0.2)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    # name: (ours, what it is checked against, the inputs that runs on: the f32 reference on
    # the f32 inputs, cuDNN on the same bf16 inputs as ours)
    cases = {
        "window": (
            lambda q, k, v: sliding_window_attention(q, k, v, window=args.window // 4),
            lambda q, k, v: sliding_window_attention_reference(q, k, v, window=args.window // 4),
            f32,
        ),
        "window vs cuDNN window": (
            lambda q, k, v: sliding_window_attention(q, k, v, window=args.window // 4),
            cudnn_window(args.window // 4),
            (q, k, v),
        ),
        "global 20%": (
            lambda q, k, v: conditional_global_attention(q, k, v, route),
            lambda q, k, v: conditional_global_attention_reference(q, k, v, route),
            f32,
        ),
        "global 100% vs cuDNN": (
            lambda q, k, v: conditional_global_attention(q, k, v, jnp.ones((1, t), bool)),
            cudnn_causal,
            (q, k, v),
        ),
    }
    rows = []
    for name, (ours, ref, inputs) in cases.items():
        got_o, got_g = fwd_bwd(ours)(q, k, v, do)
        want_o, want_g = fwd_bwd(ref)(*inputs, do.astype(inputs[0].dtype))
        row = {"check": name, "T": t, "out": rel_err(got_o, want_o)}
        row.update({f"d{n}": rel_err(g, w) for n, g, w in zip("qkv", got_g, want_g, strict=True)})
        ok = all(np.isfinite(x) and x < 2e-2 for x in list(row.values())[2:])
        row["ok"] = ok
        rows.append(row)
        print(
            f"check {name:<22} T={t}: "
            + "  ".join(f"{n} {row[n]:.2e}" for n in ("out", "dq", "dk", "dv"))
            + ("  OK" if ok else "  FAIL"),
            flush=True,
        )
    return rows


FORWARD_CANDIDATES = [
    (128, 64, 8, 3),
    (128, 128, 8, 3),
    (128, 64, 4, 3),
    (128, 128, 8, 2),
    (64, 64, 4, 3),
    (128, 32, 4, 3),
]
DQ_CANDIDATES = [(64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3)]
DKDV_CANDIDATES = [
    (64, 64, 4, 2),
    (64, 128, 8, 2),
    (128, 64, 8, 2),
    (128, 128, 8, 2),
    (32, 128, 4, 2),
    (64, 128, 4, 2),
    (64, 64, 4, 3),
]


def tune(args) -> tuple[AttentionBlocks, list[dict]]:
    """Coordinate search at ``--tune-len``: the forward tile by forward time, then the dQ and
    dK/dV tiles by forward+backward time, each summed over the window kernel and the global
    kernel at 20% routing."""
    t = args.tune_len
    q, k, v = qkv(jax.random.key(7), t, args)
    do = jax.random.normal(jax.random.key(8), q.shape, q.dtype)
    route = random_route(jax.random.key(9), t, 0.2)
    log = []

    def cost(blocks, backward):
        total = 0.0
        for name, fn in (
            (
                "window",
                lambda q, k, v, route: sliding_window_attention(
                    q, k, v, window=args.window, blocks=blocks
                ),
            ),
            (
                "global",
                lambda q, k, v, route: conditional_global_attention(q, k, v, route, blocks=blocks),
            ),
        ):
            try:
                if backward:
                    run = fwd_bwd(lambda q, k, v, fn=fn: fn(q, k, v, route))
                    total += median_ms(run, q, k, v, do, reps=max(3, args.reps // 2))
                else:
                    total += median_ms(jax.jit(fn), q, k, v, route, reps=args.reps)
            except Exception as e:  # a tile that does not fit the chip's shared memory
                print(f"  {name} {blocks}: failed ({type(e).__name__})", flush=True)
                return float("inf")
        return total

    def pick(field, candidates, current, backward):
        best, best_ms = current, float("inf")
        for c in candidates:
            blocks = AttentionBlocks(**{**current.__dict__, field: BlockConfig(*c)})
            ms = cost(blocks, backward)
            log.append({"kernel": field, "tile": c, "ms": ms, "backward": backward})
            print(
                f"tune {field:<7} q{c[0]:<3} k{c[1]:<3} warps {c[2]} stages {c[3]}: {ms:8.2f} ms",
                flush=True,
            )
            if ms < best_ms:
                best, best_ms = blocks, ms
        return best

    blocks = AttentionBlocks(
        *(BlockConfig(*c[0]) for c in (FORWARD_CANDIDATES, DQ_CANDIDATES, DKDV_CANDIDATES))
    )
    blocks = pick("forward", FORWARD_CANDIDATES, blocks, backward=False)
    blocks = pick("dq", DQ_CANDIDATES, blocks, backward=True)
    blocks = pick("dkdv", DKDV_CANDIDATES, blocks, backward=True)
    print(f"tuned: {blocks}", flush=True)
    return blocks, log


def matmul_tflops(reps: int) -> float:
    n = 8192
    a = jax.random.normal(jax.random.key(4), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(5), (n, n), jnp.bfloat16)
    ms = median_ms(jax.jit(lambda a, b: a @ b), a, b, reps=reps)
    return 2 * n**3 / ms / 1e9


def window_pairs(t: int, w: int) -> int:
    m = min(t, w)
    return m * (m + 1) // 2 + (t - m) * w


def routed_pairs(route: jax.Array) -> int:
    return int(np.sum(np.nonzero(np.asarray(route[0]))[0] + 1))


def record(rows, args, t, do, what, density, pairs, fn, inputs):
    """Times ``fn(*inputs)`` forward and forward+backward; speedups against the cuDNN row of
    the same T (which must come first)."""
    flops = 4 * args.heads * args.head_dim * pairs
    fwd_ms = median_ms(jax.jit(fn), *inputs, reps=args.reps)
    both_ms = median_ms(fwd_bwd(fn), *inputs, do, reps=args.reps)
    row = {
        "what": what,
        "T": t,
        "density": density,
        "fwd_ms": fwd_ms,
        "fwd_bwd_ms": both_ms,
        "fwd_tflops": flops / fwd_ms / 1e9,
        "fwd_bwd_tflops": 3.5 * flops / both_ms / 1e9,
        "ideal": t * (t + 1) / 2 / pairs,
    }
    rows.append(row)
    dense = next(r for r in rows if r["T"] == t and r["what"] == "cuDNN dense causal")
    row["speedup_fwd"] = dense["fwd_ms"] / fwd_ms
    row["speedup_fwd_bwd"] = dense["fwd_bwd_ms"] / both_ms
    print(
        f"T={t:>6} {what:<24} {density if density is not None else '':>5} "
        f"fwd {fwd_ms:8.2f} ms ({row['fwd_tflops']:4.0f} TF/s, x{row['speedup_fwd']:.2f})  "
        f"f+b {both_ms:8.2f} ms ({row['fwd_bwd_tflops']:4.0f} TF/s, "
        f"x{row['speedup_fwd_bwd']:.2f})  ideal x{row['ideal']:.2f}",
        flush=True,
    )


def main():
    args = parse_args()
    device = jax.devices()[0]
    meta = {
        "device": device.device_kind,
        "jax": jax.__version__,
        "date": datetime.date.today().isoformat(),
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "window": args.window,
        "command": " ".join(sys.argv),
    }
    print(json.dumps(meta), flush=True)
    if device.platform != "gpu":
        raise SystemExit("bench/attention.py times GPU kernels; no GPU is visible to JAX")
    checks = [] if args.skip_check else check(args)
    blocks, tune_log = tune(args) if args.tune else (None, [])
    meta["blocks"] = str(blocks) if blocks else "default heuristics"
    warm_up_gpu()
    peak = matmul_tflops(args.reps)
    print(f"bf16 matmul 8192^3: {peak:.0f} TFLOP/s", flush=True)

    rows = []
    for t in args.seq_lens:
        q, k, v = qkv(jax.random.key(t), t, args)
        q2, k2, v2 = qkv(jax.random.key(t + 1), t, args)
        do = jax.random.normal(jax.random.key(t + 2), q.shape, q.dtype)

        common = (rows, args, t, do)
        record(*common, "cuDNN dense causal", None, t * (t + 1) // 2, cudnn_causal, (q, k, v))
        w_pairs = window_pairs(t, args.window)
        record(*common, "cuDNN sliding window", None, w_pairs, cudnn_window(args.window), (q, k, v))
        record(
            *common,
            "window",
            None,
            w_pairs,
            lambda q, k, v: sliding_window_attention(q, k, v, window=args.window, blocks=blocks),
            (q, k, v),
        )
        for density in args.densities:
            route = random_route(jax.random.key(t + 3), t, density)
            g_pairs = routed_pairs(route)
            record(
                *common,
                "global",
                density,
                g_pairs,
                lambda q, k, v, route: conditional_global_attention(q, k, v, route, blocks=blocks),
                (q, k, v, route),
            )

            def layer(q, k, v, q2, k2, v2, route):
                # the L2A layer: window attention for all tokens + global attention for the
                # routed ones, each branch with its own q/k/v
                local = sliding_window_attention(q, k, v, window=args.window, blocks=blocks)
                return local + conditional_global_attention(q2, k2, v2, route, blocks=blocks)

            record(
                *common,
                "window + global (layer)",
                density,
                w_pairs + g_pairs,
                layer,
                (q, k, v, q2, k2, v2, route),
            )

    table = format_table(rows, meta, peak, checks)
    print("\n" + table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"attention-{meta['device'].replace(' ', '_')}"
        (args.out / f"{stem}.json").write_text(
            json.dumps(
                {
                    "meta": meta,
                    "matmul_tflops": peak,
                    "checks": checks,
                    "rows": rows,
                    "tune": tune_log,
                },
                indent=1,
            )
        )
        (args.out / f"{stem}.md").write_text(table)


def format_table(rows, meta, peak, checks) -> str:
    lines = [
        f"{meta['device']}, jax {meta['jax']}, {meta['date']}; B=1, Hq={meta['heads']}, "
        f"Hkv={meta['kv_heads']}, D={meta['head_dim']}, bf16, window {meta['window']}; "
        f"bf16 matmul {peak:.0f} TFLOP/s",
        "",
        "| what | T | routed | fwd ms | fwd TFLOP/s | fwd vs cuDNN | f+b ms | f+b TFLOP/s "
        "| f+b vs cuDNN | ideal |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['what']} | {r['T'] // 1024}K | {r['density'] if r['density'] else ''} | "
            f"{r['fwd_ms']:.2f} | {r['fwd_tflops']:.0f} | {r['speedup_fwd']:.2f}x | "
            f"{r['fwd_bwd_ms']:.2f} | {r['fwd_bwd_tflops']:.0f} | {r['speedup_fwd_bwd']:.2f}x | "
            f"{r['ideal']:.2f}x |"
        )
    if checks:
        lines += ["", "| check | T | out | dq | dk | dv |", "|---|---|---|---|---|---|"]
        lines += [
            f"| {c['check']} | {c['T']} | {c['out']:.1e} | {c['dq']:.1e} | {c['dk']:.1e} "
            f"| {c['dv']:.1e} |"
            for c in checks
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
