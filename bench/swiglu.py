"""The feed-forward's gated half, ``silu(x @ w_gate) * (x @ w_up)``, on Hopper: the fused
Mosaic GPU kernel (``pallas_kernels/swiglu.py``) against what XLA runs for the jnp form (one
cuBLAS matmul for both products, then an elementwise pass), same card, same run, and against
the cuBLAS matmul alone (the products without the gate: a floor for the unfused form).

Values are checked first against float64 NumPy at small shapes, then the timed outputs against
the jnp form's.

    python bench/swiglu.py --out bench/results/

FLOPs: 2 * tokens * hidden * 2 * intermediate. Times as ``bench/attention.py`` takes them.
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

from attention import median_ms, warm_up_gpu  # noqa: E402
from variants import write_results  # noqa: E402

from l2a_jax.attention import swiglu as jnp_swiglu  # noqa: E402
from pallas_kernels import swiglu  # noqa: E402

CHECKS = [(128, 64, 128), (384, 896, 640), (2048, 896, 4864), (1024, 1536, 8960)]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--hidden", type=int, default=896, help="Qwen2.5-0.5B: 896")
    p.add_argument("--intermediate", type=int, default=4864, help="Qwen2.5-0.5B: 4864")
    p.add_argument("--stages", type=int, nargs="+", default=[3, 4])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", type=pathlib.Path, default=None)
    return p.parse_args()


def inputs(key, m, k, f):
    kx, kg, ku = jax.random.split(key, 3)
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w_gate = (jax.random.normal(kg, (k, f)) / k**0.5).astype(jnp.bfloat16)
    w_up = (jax.random.normal(ku, (k, f)) / k**0.5).astype(jnp.bfloat16)
    return x, w_gate, w_up


def check(m, k, f) -> dict:
    x, w_gate, w_up = inputs(jax.random.key(m + k + f), m, k, f)
    out = np.asarray(jax.jit(swiglu.swiglu_up)(x, w_gate, w_up), np.float64)
    xd, gd, ud = (np.asarray(a, np.float64) for a in (x, w_gate, w_up))
    g, u = xd @ gd, xd @ ud
    want = g / (1.0 + np.exp(-g)) * u
    np.testing.assert_allclose(out, want, atol=1e-2, rtol=2.0**-7)
    row = {"check": (m, k, f), "max_abs_err": float(np.max(np.abs(out - want)))}
    print(row, flush=True)
    return row


def main():
    args = parse_args()
    if not swiglu.on_hopper():
        sys.exit("bench/swiglu.py needs a Hopper GPU (H100, H200)")
    device = jax.devices()[0].device_kind
    checks = [check(*c) for c in CHECKS]
    warm_up_gpu()
    rows = []
    k, f = args.hidden, args.intermediate
    for m in args.tokens:
        x, w_gate, w_up = inputs(jax.random.key(m), m, k, f)
        flops = 2 * m * k * 2 * f
        both = jnp.concatenate([w_gate, w_up], axis=1)
        unfused = jax.jit(jnp_swiglu)
        want = unfused(x, w_gate, w_up)
        impls = {
            "xla (cuBLAS + elementwise)": (unfused, (x, w_gate, w_up)),
            "cuBLAS products alone": (jax.jit(lambda x, w: x @ w), (x, both)),
        }
        for stages in args.stages:
            fused = jax.jit(functools.partial(swiglu.swiglu_up, stages=stages))
            impls[f"fused, {stages} stages"] = (fused, (x, w_gate, w_up))
        for name, (fn, fn_args) in impls.items():
            ms = median_ms(fn, *fn_args, reps=args.reps)
            row = {"tokens": m, "impl": name, "ms": ms, "tflops": flops / ms / 1e9}
            if name.startswith("fused"):
                diff = jnp.abs(fn(*fn_args).astype(jnp.float32) - want.astype(jnp.float32))
                row["max_abs_diff"] = float(jnp.max(diff))
            rows.append(row)
            print(row, flush=True)
    print(f"\n{device}, hidden {k}, intermediate {f}, bf16, forward only")
    print("| tokens | impl | ms | TFLOP/s | vs xla |")
    print("|---|---|---|---|---|")
    for m in args.tokens:
        mine = [r for r in rows if r["tokens"] == m]
        base = mine[0]["ms"]
        for r in mine:
            print(
                f"| {m} | {r['impl']} | {r['ms']:.3f} | {r['tflops']:.0f} | {base / r['ms']:.2f}x |"
            )
    write_results(args.out, "swiglu-{device}", device, args, checks + rows)


if __name__ == "__main__":
    main()
