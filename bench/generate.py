"""Serving on one GPU: time to first token (a batched prefill that fills the KV caches and
returns the next token's logits) at several prompt lengths, time per output token of the
on-device decode loop at one context length, and KV-cache bytes, for the base model and L2A
variants, each in a fresh process (so peak memory belongs to that variant alone).

    python bench/generate.py                                  # Qwen2.5-0.5B shape, 32K and 128K
    python bench/generate.py --lengths 32768 --variants base,l2a_random --out bench/results

Variants: ``base`` (full attention; ``--impl auto`` on a GPU runs its prefill on cuDNN),
``l2a_random`` (every layer L2A, ``--density`` of tokens routed at random: the cost of a
learned router at that density; decode timed with decode-time skipping on and off),
``l2a_swa`` (every layer L2A, no token routed: no global cache at all), ``l2a_half_pruned``
(``l2a_random`` with the global branches of every other layer pruned). Weights are random.
Prefill and decode run on a ``serving_model`` (weights taken out of the module and layers
stacked once, as a server would at load time); the TTFT of the same prefill called with the
module itself, which redoes that on every call, is reported beside it.
``--profile`` adds one prefill per length under the profiler, its kernels summed by the
model's named scopes (``gpu_profile.py``), in processes without XLA's command buffers.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from variants import (  # noqa: E402
    add_shape_args,
    qwen_shape,
    run_variants,
    shape_line,
    write_results,
)

VARIANTS = ("base", "l2a_random", "l2a_swa", "l2a_half_pruned")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--lengths", default="32768,131072", help="prompt lengths for TTFT")
    p.add_argument("--decode-context", type=int, default=32768)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    add_shape_args(p)
    p.add_argument("--impl", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--profile",
        action="store_true",
        help="one more prefill per length under the profiler: kernel time by operation",
    )
    p.add_argument("--out", type=pathlib.Path, default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _timed(fn, repeats):
    """(first call s, median of the next ``repeats`` s, last result)."""
    import jax

    times, out = [], None
    for _ in range(1 + repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1:]), out


def run_variant(args) -> dict:
    if args.profile:
        from gpu_profile import without_command_buffers

        without_command_buffers()
    import jax
    import numpy as np
    from flax import nnx

    from l2a_jax import L2AConfig, QwenModel, convert_to_l2a
    from l2a_jax.convert import prune_global_branches
    from l2a_jax.generate import cache_size, decode, prefill, serving_model

    lengths = [int(x) for x in args.lengths.split(",")]
    # decode: one prefill, then the decode loop of ``decode_tokens`` steps, repeatedly, with
    # skipping on and off; the cache holds all of it, rounded up to the tiles
    n, context = args.decode_tokens, args.decode_context
    calls = 2 * (1 + args.repeats)
    capacity = -(-(context + n * calls + 1) // 128) * 128
    longest = max(*lengths, capacity)
    cfg = qwen_shape(args, context=longest)
    model = QwenModel(cfg, dtype=args.dtype, attention_impl=args.impl, rngs=nnx.Rngs(0))
    if args.one == "l2a_random":
        routing = dict(mode="random", random_densities=(args.density,) * args.layers)
        model = convert_to_l2a(model, L2AConfig(window=args.window, **routing))
    elif args.one == "l2a_half_pruned":
        routing = dict(mode="random", random_densities=(args.density,) * args.layers)
        model = convert_to_l2a(model, L2AConfig(window=args.window, **routing))
        model = prune_global_branches(model, range(0, args.layers, 2))
    elif args.one == "l2a_swa":
        model = convert_to_l2a(model, L2AConfig(window=args.window, mode="swa"))
    rng = np.random.default_rng(0)
    row = {"variant": args.one, "attention": model.attention.describe(), "ttft": {}}
    served = serving_model(model)  # a server's weights: taken out and stacked once, at load
    for t in lengths:
        ids = rng.integers(0, args.vocab, (args.batch, t))
        compile_s, ttft, (logits, cache) = _timed(
            lambda ids=ids, t=t: prefill(served, ids, capacity=t), args.repeats
        )
        # the same from the module on every call (its graph walked, its layers stacked)
        _, module_ttft, _ = _timed(lambda ids=ids, t=t: prefill(model, ids, capacity=t), 2)
        if not np.isfinite(np.asarray(logits)).all():
            raise SystemExit(f"{args.one}: non-finite logits at T={t}")
        row["ttft"][t] = {
            "first_call_s": compile_s,
            "ttft_ms": ttft * 1e3,
            "ttft_from_module_ms": module_ttft * 1e3,
            "cache_bytes": cache.nbytes,
            "cache_bytes_planned": args.batch * cache_size(model, t).total,
        }
        del logits, cache
        if args.profile:
            from gpu_profile import profile_call

            row["ttft"][t]["profile"] = profile_call(
                lambda ids=ids, t=t: prefill(served, ids, capacity=t)
            )
    logits, cache = prefill(
        served, rng.integers(0, args.vocab, (args.batch, context)), capacity=capacity
    )
    first = np.argmax(np.asarray(logits), axis=-1)
    row["decode"] = {}
    both = args.one in ("l2a_random", "l2a_half_pruned")
    ways = [("skip", True), ("read_all", False)] if both else [("skip", True)]
    for how, skip in ways:
        times = []
        for i in range(1 + args.repeats):
            start = time.perf_counter()
            tokens, cache = decode(served, cache, first, max_new_tokens=n, skip=skip, seed=i)
            jax.block_until_ready(tokens)
            times.append(time.perf_counter() - start)
        row["decode"][how] = {
            "first_call_s": times[0],
            "ms_per_token": statistics.median(times[1:]) / n * 1e3,
        }
    row["decode_cache_bytes"] = cache.nbytes
    row["cache_per_token_bytes"] = cache_size(model, context).per_token
    row["cache_fixed_bytes"] = cache_size(model, context).fixed
    stats = jax.devices()[0].memory_stats() or {}
    row["peak_gib"] = stats.get("peak_bytes_in_use", 0) / 2**30
    return row


def main():
    args = parse_args()
    stem = "generate-{device}"
    ran = run_variants(args, run_variant, __file__, VARIANTS, stem=stem)
    if ran is None:
        return
    device, rows, base = ran
    print(f"\n{device}, B={args.batch}, {shape_line(args)}")
    print("| variant | T | TTFT ms | vs base | TTFT from the module ms | cache MiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | failed: {r['error'].splitlines()[-1]} |")
            continue
        for t, m in r["ttft"].items():
            ref = base["ttft"][t]["ttft_ms"] if base else None
            speed = f"{ref / m['ttft_ms']:.2f}x" if ref else ""
            print(
                f"| {r['variant']} | {t} | {m['ttft_ms']:.1f} | {speed} | "
                f"{m['ttft_from_module_ms']:.1f} | {m['cache_bytes'] / 2**20:.0f} |"
            )
    print(
        f"\n| variant | decode at {args.decode_context} | ms/token | cache bytes/token | peak GiB |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            continue
        for how, m in r["decode"].items():
            print(
                f"| {r['variant']} | {how} | {m['ms_per_token']:.3f} | "
                f"{r['cache_per_token_bytes']} (+{r['cache_fixed_bytes']} fixed) | "
                f"{r['peak_gib']:.1f} |"
            )
    write_results(args.out, stem, device, args, rows)


if __name__ == "__main__":
    main()
