"""The same training steps of a Qwen-shaped L2A model on one GPU and sharded over every GPU of
the machine, each configuration in a fresh process: per configuration the losses of every
step, step time, tokens/s per GPU, peak memory per GPU and the mesh.

    python bench/multi_gpu.py                        # on a machine with 2 (or 4, 8) GPUs
    python bench/multi_gpu.py --variants one,seq --out bench/results
    python bench/multi_gpu.py --profile     # one more step under the profiler: NCCL's share
    JAX_DEFAULT_MATMUL_PRECISION=highest python bench/multi_gpu.py --dtype float32 --lr 1e-12
                                            # float32, weights fixed: equal to the last bits

Variants (n = the machine's GPU count):
  one        1 GPU, batch ``--batch`` x ``--seq-len``
  data       data=n: rows split over the GPUs
  fsdp       fsdp=n: rows, weights and optimizer state split
  seq        seq=n: every sequence split (context parallelism)
  long_one   1 GPU, one ``--long-len`` sequence (expected not to fit)
  long_seq   seq=n, the same long sequence
The first four see the same batches and must log the same losses. Weights are random, every
layer L2A with a router drawn at random (so some tokens route and some skip); the dense-step
coin (``--dense-prob``) is on half of the steps, so both kinds of step are compared. With Adam,
last-bit gradient differences between meshes grow after a few steps (Adam's first updates
are about +-lr whatever a gradient's size, and the routers' thresholds flip tokens);
``--lr 1e-12`` holds the weights fixed, so each step compares forward and backward alone.

NVLink multicast stays off (``NCCL_NVLS_ENABLE=0``) in this process and its children, as the
shared hosts require; ``XLA_PYTHON_CLIENT_MEM_FRACTION`` is raised to 0.95 so one GPU's
limit is its memory, not JAX's default 75% share.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from variants import (  # noqa: E402
    add_shape_args,
    qwen_shape,
    run_variants,
    shape_line,
    write_results,
)

# variant -> (mesh axis that takes every GPU, or None for one GPU; long sequence?)
VARIANTS = {
    "one": (None, False),
    "data": ("data", False),
    "fsdp": ("fsdp", False),
    "seq": ("seq", False),
    "long_one": (None, True),
    "long_seq": ("seq", True),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}")
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--long-len", type=int, default=262144)
    add_shape_args(p)
    p.add_argument("--impl", default="auto", help="attention implementation")
    p.add_argument("--steps", type=int, default=4, help="steps (the first one compiles)")
    p.add_argument(
        "--dense-prob",
        type=float,
        default=0.5,
        help="chance that a step routes every token (1: no step depends on a routing decision)",
    )
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    p.add_argument("--remat", default="dots", help="none, full or dots (per layer)")
    p.add_argument(
        "--master-dtype",
        default="float32",
        help="trainable weights and Adam state (compute: --dtype)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="one more step under the profiler: the collectives' share of its time",
    )
    p.add_argument("--out", type=pathlib.Path, default=None, help="folder for the JSON results")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process's variant
    return p.parse_args(argv)


def run_variant(args) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from l2a_jax import Batch, L2AConfig, QwenModel, convert_to_l2a
    from l2a_jax.convert import random_routers
    from l2a_jax.sharding import make_mesh
    from l2a_jax.training import TrainConfig, init_state, jit_train_step

    axis, long = VARIANTS[args.one]
    seq_len, batch = (args.long_len, 1) if long else (args.seq_len, args.batch)
    gpus = jax.devices() if axis else jax.devices()[:1]
    mesh = make_mesh(devices=gpus, **({axis: len(gpus)} if axis else {}))
    cfg = qwen_shape(args, context=max(seq_len, 32768))
    model = QwenModel(cfg, dtype=args.dtype, attention_impl=args.impl, mesh=mesh, rngs=nnx.Rngs(0))
    model = random_routers(convert_to_l2a(model, L2AConfig(window=args.window)), seed=1)
    train_cfg = TrainConfig(
        learning_rate=args.lr, warmup_steps=1, total_steps=1000, sparsity_warmup_steps=1,
        sparsity_weight=1e-6, dense_step_prob=args.dense_prob, remat=args.remat,
        master_dtype=args.master_dtype, compute_dtype=args.dtype,
    )  # fmt: skip
    # seed 1: the dense-step coin comes up dense, sparse, sparse, sparse, dense (seed 0's first
    # dozen are all dense)
    graphdef, state, frozen = init_state(model, train_cfg, seed=1)
    del model
    step = jit_train_step(graphdef, train_cfg, state, frozen)
    rng = np.random.default_rng(0)
    losses, dense, routed, norms, times = [], [], [], [], []
    for _ in range(args.steps):
        tokens = Batch.of(rng.integers(0, args.vocab, (batch, seq_len)))
        start = time.perf_counter()
        state, metrics = step(state, frozen, tokens)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
        losses.append(float(metrics["loss"]))
        dense.append(bool(metrics["dense_step"]))
        routed.append(float(metrics["routed_fraction"]))
        norms.append(float(metrics["grad_norm"]))
    profile = None
    if args.profile:
        from gpu_profile import format_report, profile_call

        tokens = Batch.of(rng.integers(0, args.vocab, (batch, seq_len)))
        profile = profile_call(step, state, frozen, tokens)
        print(format_report(profile), flush=True)
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in gpus]
    step_s = statistics.median(times[1:]) if len(times) > 1 else times[0]
    return {
        "variant": args.one,
        "mesh": {k: int(v) for k, v in mesh.shape.items() if v > 1} or {"gpus": 1},
        "gpus": len(gpus),
        "batch": batch,
        "seq_len": seq_len,
        "losses": losses,
        "dense_steps": dense,
        "routed_fraction": statistics.mean(routed),
        "routed_fractions": routed,
        "grad_norms": norms,
        "first_step_s": times[0],
        "step_s": step_s,
        "tokens_per_s_per_gpu": batch * seq_len / step_s / len(gpus),
        "peak_gib_per_gpu": max(peaks) / 2**30,
        **({"profile": profile} if profile else {}),
    }


def collectives(profile: dict | None) -> str:
    """The profiled step's collective kernel time and the part no compute overlapped, as
    shares of its wall time."""
    if not profile:
        return "not profiled"
    if "error" in profile:
        return "no GPU kernels in the trace"
    wall = profile["wall_s"]
    summed = profile["kernel_s"].get("collective", 0.0)
    return f"{100 * summed / wall:.1f}% / {100 * profile['collective_exposed_s'] / wall:.1f}%"


def main():
    args = parse_args()
    stem = "multi-gpu-{device}"
    ran = run_variants(args, run_variant, __file__, VARIANTS, stem=stem)
    if ran is None:
        return
    device, rows, _ = ran
    import jax

    print(
        f"\n{jax.device_count()} x {device}, {shape_line(args)}, remat {args.remat}, "
        f"master weights {args.master_dtype}"
    )
    print("losses: d marks a dense step (every token routed)")
    print(
        "| variant | mesh | B x T | losses | step s | tokens/s per GPU | peak GiB per GPU "
        "| collectives: kernel time / not overlapped |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            reason = r["error"].strip().splitlines()[-1][:160]
            print(f"| {r['variant']} | failed: {reason} |")
            continue
        losses = ", ".join(
            f"{x:.6f}{'d' if d else ''}" for x, d in zip(r["losses"], r["dense_steps"], strict=True)
        )
        print(
            f"| {r['variant']} | {r['mesh']} | {r['batch']} x {r['seq_len']} | {losses} | "
            f"{r['step_s']:.3f} | {r['tokens_per_s_per_gpu'] / 1e3:.1f}K | "
            f"{r['peak_gib_per_gpu']:.1f} | {collectives(r.get('profile'))} |"
        )
    ref = next((r for r in rows if r["variant"] == "one" and "error" not in r), None)
    for r in rows:
        if ref and "error" not in r and r["variant"] in ("data", "fsdp", "seq"):
            worst = max(abs(a - b) for a, b in zip(r["losses"], ref["losses"], strict=True))
            print(f"{r['variant']}: largest loss difference from one GPU {worst:.2e}")
    write_results(args.out, stem, device, args, rows)


if __name__ == "__main__":
    main()
