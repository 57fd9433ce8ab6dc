"""Where the forward kernels' time goes: the real kernel against timing-only variants that drop
parts of the online softmax. The variants compute WRONG values on purpose; they exist to show
how much of each tile's time the softmax takes next to the two matmuls and the tile loads.

    python bench/forward_ablation.py --out bench/results

Variants, each on the default tiles (bench/RESULTS.md says which):
- kernel: the real forward;
- no exp2: both exp2 calls replaced by one multiply-add (no special-function unit);
- no rescale: no running max, so neither the max nor the rescaling of the accumulator;
- matmuls only: scores cast to bf16 and multiplied by V; no softmax at all.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from attention import median_ms, qkv, random_route, routed_pairs, warm_up_gpu, window_pairs  # noqa: E402

from pallas_kernels import conditional_global_attention, flash, sliding_window_attention  # noqa: E402

VARIANTS = ("kernel", "no exp2", "no rescale", "matmuls only")


def ablated_body(variant):
    """A forward body with the same loads, loops and output as ``flash._forward_body``."""

    def body(qpos, ranges, qseg_ref, kseg_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, spec):
        bk = spec.blocks.forward.block_k
        q = q_ref[...]
        scale = spec.sm_scale * flash.LOG2E
        qseg = qseg_ref[...][:, None] if spec.has_segments else None

        def exp2(x):
            return x * 1e-3 + 1.0 if variant == "no exp2" else flash._exp2(x, spec)

        def tile(kb, carry, *, causal_edge):
            acc, m, denom = carry
            tiles = flash._key_tile(
                kb, bk, q, qpos, qseg, k_ref, v_ref, kseg_ref, spec, causal_edge
            )
            _, v, s, mask = tiles
            if variant == "matmuls only":
                return acc + flash._dot(s.astype(v.dtype), v), m, denom
            if mask is not None:
                s = jnp.where(mask, s, -jnp.inf)
            if variant == "no rescale":
                p = exp2(s * scale - m[:, None])
                return acc + flash._dot(p.astype(v.dtype), v), m, denom + jnp.sum(p, axis=1)
            m_new = jnp.maximum(m, jnp.max(s, axis=1) * scale)
            alpha = exp2(m - m_new)
            p = exp2(s * scale - m_new[:, None])
            denom = denom * alpha + jnp.sum(p, axis=1)
            return acc * alpha[:, None] + flash._dot(p.astype(v.dtype), v), m_new, denom

        bq, d = q.shape
        m0 = 0.0 if variant == "no rescale" else flash._M_INIT
        carry = (
            jnp.zeros((bq, d), jnp.float32),
            jnp.full((bq,), m0, jnp.float32),
            jnp.zeros((bq,), jnp.float32),
        )
        acc, m, denom = flash._over_tiles(ranges, tile, carry)
        o_ref[...] = (acc / jnp.maximum(denom, 1e-30)[:, None]).astype(o_ref.dtype)
        lse_ref[...] = m

    return body


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--density", type=float, default=0.2)
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", type=pathlib.Path, default=None)
    args = p.parse_args()
    if jax.devices()[0].platform != "gpu":
        raise SystemExit("bench/forward_ablation.py times GPU kernels; no GPU is visible to JAX")

    t = args.seq_len
    q, k, v = qkv(jax.random.key(t), t, args)
    route = random_route(jax.random.key(t + 3), t, args.density)
    flops = {
        "window": 4 * args.heads * args.head_dim * window_pairs(t, args.window),
        "global": 4 * args.heads * args.head_dim * routed_pairs(route),
    }
    ops = {
        "window": lambda q, k, v, r: sliding_window_attention(q, k, v, window=args.window),
        "global": lambda q, k, v, r: conditional_global_attention(q, k, v, r),
    }
    warm_up_gpu()
    real_body = flash._forward_body
    rows = []
    try:
        for variant in VARIANTS:
            flash._forward_body = real_body if variant == "kernel" else ablated_body(variant)
            jax.clear_caches()  # the kernels are traced again, with this body
            for name, fn in ops.items():
                ms = median_ms(jax.jit(fn), q, k, v, route, reps=args.reps)
                rows.append(
                    {"op": name, "variant": variant, "ms": ms, "tflops": flops[name] / ms / 1e9}
                )
                print(json.dumps(rows[-1]), flush=True)
    finally:
        flash._forward_body = real_body

    kernel = {r["op"]: r["ms"] for r in rows if r["variant"] == "kernel"}
    lines = [
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}; T={t}, B=1, Hq={args.heads}, "
        f"Hkv={args.kv_heads}, D={args.head_dim}, bf16, window {args.window}, "
        f"global {args.density:.0%} routed",
        "",
        "| op | variant | fwd ms | TFLOP/s | share of the kernel's time |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        share = r["ms"] / kernel[r["op"]]
        lines.append(
            f"| {r['op']} | {r['variant']} | {r['ms']:.2f} | {r['tflops']:.0f} | {share:.0%} |"
        )
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"forward-ablation-{jax.devices()[0].device_kind.replace(' ', '_')}"
        (args.out / f"{stem}.json").write_text(
            json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=1)
        )
        (args.out / f"{stem}.md").write_text(table)


if __name__ == "__main__":
    main()
