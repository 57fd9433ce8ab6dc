"""Write a random-weight Qwen-shaped checkpoint (HF-style directory), optionally as an L2A
model, for trying generation and evaluation at full size without downloading weights.

    python bench/random_checkpoint.py /tmp/qwen05b-l2a --l2a random --density 0.2 --context 131072
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=pathlib.Path)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--intermediate", type=int, default=4864)
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--l2a", choices=("none", "l2a", "random", "swa"), default="random")
    p.add_argument("--density", type=float, default=0.2, help="routed fraction for --l2a random")
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args(argv)

    from flax import nnx

    from l2a_jax import L2AConfig, ModelConfig, QwenModel, RopeConfig, convert_to_l2a, to_hf

    cfg = ModelConfig(
        architecture="Qwen2ForCausalLM",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=args.context,
        qkv_bias=True,
        rope=RopeConfig(theta=5e6),
    )
    model = QwenModel(cfg, dtype=args.dtype, rngs=nnx.Rngs(0))
    if args.l2a != "none":
        extra = {"random_densities": (args.density,) * args.layers} if args.l2a == "random" else {}
        model = convert_to_l2a(model, L2AConfig(window=args.window, mode=args.l2a, **extra))
    to_hf(model, args.out, dtype=args.dtype)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
