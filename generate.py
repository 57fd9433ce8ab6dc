"""Continue a prompt with a trained model: ``python generate.py --model DIR --prompt TEXT``.

``--model`` is an HF-style checkpoint directory or a training workdir (default: runs/tiny, the
README's main job). The prompt comes from ``--prompt`` or ``--prompt-file``; the continuation
goes to stdout, timings and cache size to stderr."""

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

from l2a_jax.config import ConfigError
from l2a_jax.generate import cache_size, generate
from l2a_jax.sources import load_model
from l2a_jax.weights import CheckpointError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/tiny", help="checkpoint directory or workdir")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--prompt-file", type=Path, help="a UTF-8 file holding the prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="bytes, qwen or a tokenizer directory (default: found)")
    p.add_argument("--dtype", help="bfloat16 on a GPU, float32 elsewhere by default")
    p.add_argument("--attention-impl", default="auto", choices=("auto", "xla", "pallas", "cudnn"))
    p.add_argument("--no-skip", action="store_true", help="read every global cache at decode")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        if args.prompt_file is not None:
            if not args.prompt_file.is_file():
                raise ConfigError(f"prompt file {args.prompt_file} does not exist")
            text = args.prompt_file.read_text(encoding="utf-8")
        else:
            text = args.prompt
        model, tokenizer = load_model(
            args.model,
            dtype=args.dtype,
            attention_impl=args.attention_impl,
            tokenizer=args.tokenizer,
        )
        ids = tokenizer.encode(text)
        if not ids:
            raise ConfigError("the prompt is empty; give at least one character")
        start = time.perf_counter()
        new = generate(
            model,
            np.asarray([ids]),
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            eos_token_id=tokenizer.eos_id,
            seed=args.seed,
            skip=not args.no_skip,
        )
        new = jax.device_get(new)[0].tolist()
        seconds = time.perf_counter() - start
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if tokenizer.eos_id in new:
        new = new[: new.index(tokenizer.eos_id)]
    print(tokenizer.decode(new))
    size = cache_size(model, len(ids) + args.max_new_tokens)
    print(
        f"[{len(ids)} prompt tokens, {len(new)} new, {seconds:.2f} s with compilation; KV cache "
        f"{size.total / 2**20:.2f} MiB ({size.per_token} bytes per token + {size.fixed} fixed)]",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
