"""One training step of a Qwen-shaped model on one GPU: compile time, step time, tokens/s and
peak device memory, for the base model and L2A variants, each in a fresh process (so peak
memory belongs to that variant alone) on a 1-device mesh, through ``jit_train_step`` (frozen
weights as arguments, the state donated).

    python bench/train_step.py                                   # Qwen2.5-0.5B shape, 32K
    python bench/train_step.py --seq-len 131072 --layers 4 --vocab 32000
    python bench/train_step.py --variants l2a_random --steps 3 --out bench/results
    python bench/train_step.py --variants base,l2a_random --profile   # time by operation

Variants: ``base`` (full attention; with ``--impl auto`` on a GPU that is cuDNN),
``base_pallas`` (full attention on the Pallas kernel), ``l2a_random`` (every layer L2A,
``--density`` of tokens routed at random on every step: the cost of a learned router at that
density), ``l2a_swa`` (every layer L2A, no token routed). Weights are random (nothing is
downloaded); parameters in ``--dtype``. The dense-step coin is off, so every step is the
sparse step being measured. The first step is compiled ahead of time, so its time splits
into tracing and lowering, XLA's compile, and the run; ``--profile`` runs one more step under
the profiler and sums its kernels by the model's named scopes (``gpu_profile.py``); its
processes run without XLA's command buffers (CUDA graphs), whose kernels the trace cannot
attribute, so take step times from a run without ``--profile``.
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

# variant -> (L2A routing or None for the base model, attention impl or None for --impl)
VARIANTS = {
    "base": (None, None),
    "base_pallas": (None, "pallas"),
    "l2a_random": ("random", None),
    "l2a_swa": ("swa", None),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}")
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--batch", type=int, default=1)
    add_shape_args(p)
    p.add_argument("--impl", default="auto", help="attention implementation")
    p.add_argument("--steps", type=int, default=5, help="timed steps after the first")
    p.add_argument("--trainable", default="recipe", help="recipe (the L2A recipe) or all")
    p.add_argument("--remat", default="none", help="none, full or dots (per layer)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="one more step under the profiler: kernel time by operation (named scope)",
    )
    p.add_argument("--out", type=pathlib.Path, default=None, help="folder for the JSON results")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process's variant
    return p.parse_args(argv)


def run_variant(args) -> dict:
    """Builds the model, runs ``1 + args.steps`` steps and measures them (in this process)."""
    if args.profile:
        from gpu_profile import without_command_buffers

        without_command_buffers()
    import jax
    import numpy as np
    from flax import nnx

    from l2a_jax import Batch, L2AConfig, QwenModel, convert_to_l2a
    from l2a_jax.sharding import make_mesh
    from l2a_jax.training import TrainConfig, init_state, jit_train_step

    cfg = qwen_shape(args, context=max(args.seq_len, 32768))
    mesh = make_mesh(devices=jax.devices()[:1])
    model = QwenModel(cfg, dtype=args.dtype, attention_impl=args.impl, mesh=mesh, rngs=nnx.Rngs(0))
    if args.one != "base":
        mode = dict(mode="random", random_densities=(args.density,) * args.layers)
        if args.one == "l2a_swa":
            mode = dict(mode="swa")
        model = convert_to_l2a(model, L2AConfig(window=args.window, **mode))
    train_cfg = TrainConfig(
        learning_rate=1e-5, warmup_steps=1, total_steps=1000, sparsity_warmup_steps=1,
        dense_step_prob=0.0, trainable=args.trainable, remat=args.remat,
    )  # fmt: skip
    graphdef, state, frozen = init_state(model, train_cfg)
    model_attention = model.attention.describe()
    del model  # the state and the frozen weights hold every array now
    step = jit_train_step(graphdef, train_cfg, state, frozen)
    rng = np.random.default_rng(0)
    batch = Batch.of(rng.integers(0, args.vocab, (args.batch, args.seq_len)))
    # the first step, ahead of time: tracing and lowering, XLA's compile, then the run
    start = time.perf_counter()
    lowered = step.lower(state, frozen, batch)
    lower_s = time.perf_counter() - start
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start - lower_s
    state, frozen, batch = step.place(state, frozen, batch)
    hlo = compiled.as_text() or ""
    times = []
    for _ in range(1 + args.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    times[0] += lower_s + compile_s
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise SystemExit(f"{args.one}: loss is {loss}")
    step_s = statistics.median(times[1:])
    stats = jax.devices()[0].memory_stats() or {}
    profile = None
    if args.profile:
        from gpu_profile import format_report, profile_call

        profile = profile_call(compiled, state, frozen, batch)
        print(format_report(profile, top=20), flush=True)
    return {
        "variant": args.one,
        "attention": model_attention,
        "first_step_s": times[0],
        "lower_s": lower_s,
        "compile_s": compile_s,
        "while_loops": hlo.count(" while("),
        "step_s": step_s,
        "tokens_per_s": args.batch * args.seq_len / step_s,
        "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
        "loss": loss,
        "routed_fraction": float(metrics.get("routed_fraction", 1.0)),
        **({"profile": profile} if profile else {}),
    }


def main():
    args = parse_args()
    stem = f"train-step-{{device}}-T{args.seq_len}"
    ran = run_variants(args, run_variant, __file__, VARIANTS, stem=stem)
    if ran is None:
        return
    device, rows, base = ran
    graphs = ", XLA command buffers off (--profile)" if args.profile else ""
    print(
        f"\n{device}, B={args.batch}, T={args.seq_len}, {shape_line(args)}, remat "
        f"{args.remat}{graphs}"
    )
    print(
        "| variant | attention | first step s (lower + compile) | step ms | tokens/s | vs base "
        "| peak GiB | routed |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | failed: {r['error'].splitlines()[-1]} |")
            continue
        speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else ""
        print(
            f"| {r['variant']} | {r['attention']} | {r['first_step_s']:.1f} "
            f"({r['lower_s']:.1f} + {r['compile_s']:.1f}) | "
            f"{r['step_s'] * 1e3:.1f} | {r['tokens_per_s'] / 1e3:.1f}K | {speed} | "
            f"{r['peak_gib']:.1f} | {r['routed_fraction']:.2f} |"
        )
    write_results(args.out, stem, device, args, rows)


if __name__ == "__main__":
    main()
