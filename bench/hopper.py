"""The Mosaic GPU forward (``pallas_kernels/hopper.py``) against the Triton forward and cuDNN,
forward only (prefill, scoring), same card, same run:

- routed global attention: a fifth of the tokens routed at random, as compacted rows a quarter
  of the sequence long (what the model's prefill hands over), Mosaic vs Triton;
- windowed attention over every token: Mosaic vs Triton vs cuDNN's sliding window.

Values are checked first against the jnp reference at small shapes (padding rows, GQA,
head_dim 64 and 128, windows), then the timed outputs against the Triton forward.

    python bench/hopper.py --out bench/results/

FLOPs: 4 * H * D per visible (query, key) pair. Times as ``bench/attention.py`` takes them.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from attention import cudnn_window, median_ms, random_route, warm_up_gpu  # noqa: E402
from variants import write_results  # noqa: E402

from pallas_kernels import (  # noqa: E402
    hopper,  # noqa: E402
    routed_rows_attention,
    routed_rows_attention_reference,
    sliding_window_attention,
)
from pallas_kernels.attention import _take_rows, compact_routed  # noqa: E402
from pallas_kernels.blocks import default_blocks  # noqa: E402
from pallas_kernels.reference import causal_attention_reference  # noqa: E402

CHECKS = [
    # t, heads, kv heads, head_dim, routed fraction (1: every token, in order), batch, window
    (1024, 4, 2, 64, 0.3, 2, None),
    (2048, 4, 1, 128, 0.5, 1, None),
    (2048, 4, 2, 64, 1.0, 2, 300),
    (4096, 14, 2, 64, 1.0, 1, 1024),
    (1024, 4, 2, 64, 0.4, 1, 200),
]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--density", type=float, default=0.2)
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", type=pathlib.Path, default=None, help="folder for the JSON")
    return p.parse_args()


def inputs(key, b, t, hq, hkv, d):
    kq, kk, kv = jax.random.split(key, 3)
    return (
        jax.random.normal(kq, (b, t, hq, d), jnp.bfloat16),
        jax.random.normal(kk, (b, t, hkv, d), jnp.bfloat16),
        jax.random.normal(kv, (b, t, hkv, d), jnp.bfloat16),
    )


def check() -> list[dict]:
    out = []
    for i, (t, hq, hkv, d, frac, b, window) in enumerate(CHECKS):
        key = jax.random.key(i)
        q, k, v = inputs(key, b, t, hq, hkv, d)
        route = jax.random.uniform(jax.random.fold_in(key, 1), (b, t)) < frac
        qpos, _ = compact_routed(route, t)
        q_rows = _take_rows(q, qpos)
        got = hopper.routed_rows_forward(q_rows, k, v, qpos, sm_scale=d**-0.5, window=window)
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        if window is None:
            want = routed_rows_attention_reference(_take_rows(f32[0], qpos), *f32[1:], qpos)
        else:
            want = _take_rows(causal_attention_reference(*f32, window=window), qpos)
        valid = np.asarray(qpos >= 0)
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        err = float(np.abs(got - want)[valid].max())
        pad = float(np.abs(got[~valid]).max()) if (~valid).any() else 0.0
        row = dict(case=(t, hq, hkv, d, frac, b, window), max_abs_err=err, padding_max=pad)
        print(row, flush=True)
        if not (err < 2e-2 and pad == 0.0):
            raise SystemExit(f"the Mosaic GPU forward is wrong: {row}")
        out.append(row)
    return out


def timings(args) -> list[dict]:
    rows = []
    h, hkv, d, w = args.heads, args.kv_heads, args.head_dim, args.window
    scale = d**-0.5

    def record(t, op, impl, pairs, fn, xs, against=None):
        ms = median_ms(fn, *xs, reps=args.reps)
        row = dict(t=t, op=op, impl=impl, ms=ms, tflops=4.0 * pairs * h * d / ms / 1e9)
        if against is not None:
            got = np.asarray(fn(*xs), np.float32)
            row["max_abs_diff"] = float(np.max(np.abs(got - against)))
        print(row, flush=True)
        rows.append(row)

    @jax.jit
    def routed_mosaic(q_rows, k, v, qpos):
        return hopper.routed_rows_forward(q_rows, k, v, qpos, sm_scale=scale)

    @jax.jit
    def window_mosaic(q, k, v, at):
        return hopper.routed_rows_forward(q, k, v, at, sm_scale=scale, window=w)

    window_cudnn = jax.jit(cudnn_window(w))

    for t in args.seq_lens:
        key = jax.random.key(t)
        q, k, v = inputs(key, 1, t, h, hkv, d)
        route = random_route(jax.random.fold_in(key, 1), t, args.density)
        qpos, _ = compact_routed(route, t // 4)
        q_rows = _take_rows(q, qpos)
        pos = np.asarray(qpos[0])
        pairs = float(np.sum(pos[pos >= 0] + 1))
        routed_blocks = default_blocks(t, d, interpret=False, routed=True)
        routed_triton = jax.jit(functools.partial(routed_rows_attention, blocks=routed_blocks))
        xs = (q_rows, k, v, qpos)
        want = np.asarray(routed_triton(*xs), np.float32)
        record(t, "routed", "triton", pairs, routed_triton, xs)
        record(t, "routed", "mosaic", pairs, routed_mosaic, xs, against=want)

        pairs = t * w - w * (w - 1) / 2
        window_triton = jax.jit(
            functools.partial(
                sliding_window_attention, window=w, blocks=default_blocks(t, d, interpret=False)
            )
        )
        at = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (1, t))
        want = np.asarray(window_cudnn(q, k, v), np.float32)
        record(t, "window", "cudnn", pairs, window_cudnn, (q, k, v))
        record(t, "window", "triton", pairs, window_triton, (q, k, v), against=want)
        record(t, "window", "mosaic", pairs, window_mosaic, (q, k, v, at), against=want)
    return rows


def main():
    args = parse_args()
    if not hopper.on_hopper():
        raise SystemExit("bench/hopper.py needs a Hopper GPU (compute capability 9)")
    device = jax.devices()[0].device_kind
    warm_up_gpu()
    checks = check()
    rows = timings(args)
    print(f"\n{device}, heads {args.heads}/{args.kv_heads}x{args.head_dim}, bf16, forward only")
    print("| T | op | impl | ms | TFLOP/s | vs slowest |")
    print("|---|---|---|---|---|---|")
    for t in args.seq_lens:
        for op in ("routed", "window"):
            mine = [r for r in rows if r["t"] == t and r["op"] == op]
            slowest = max(r["ms"] for r in mine)
            for r in mine:
                print(
                    f"| {t} | {op} | {r['impl']} | {r['ms']:.3f} | {r['tflops']:.0f} | "
                    f"{slowest / r['ms']:.2f}x |"
                )
    write_results(args.out, "hopper-{device}", device, args, checks + rows)


if __name__ == "__main__":
    main()
