"""Write a random-weight Qwen-shaped checkpoint (HF-style directory), optionally as an L2A
model, for trying generation and evaluation at full size without downloading weights.

    python bench/random_checkpoint.py /tmp/qwen05b-l2a --l2a random --density 0.2 --context 131072
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from variants import add_shape_args, qwen_shape  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=pathlib.Path)
    add_shape_args(p)  # --density: the routed fraction of --l2a random
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--l2a", choices=("none", "l2a", "random", "swa"), default="random")
    args = p.parse_args(argv)

    from flax import nnx

    from l2a_jax import L2AConfig, QwenModel, convert_to_l2a, to_hf

    cfg = qwen_shape(args, context=args.context, rope_theta=5e6)
    model = QwenModel(cfg, dtype=args.dtype, rngs=nnx.Rngs(0))
    if args.l2a != "none":
        extra = {"random_densities": (args.density,) * args.layers} if args.l2a == "random" else {}
        model = convert_to_l2a(model, L2AConfig(window=args.window, mode=args.l2a, **extra))
    to_hf(model, args.out, dtype=args.dtype)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
