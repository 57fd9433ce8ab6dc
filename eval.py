"""Evaluate a model on long-context tasks: ``python eval.py --task niah [--workdir DIR |
--hf PATH] [--lengths 4k,8k] [--depths 0,0.5,1] [--samples N] [--batch-size N] [--out DIR]
[--seed S] [--scoring generate|likelihood]``.

Tasks: niah (RULER's niah_single_1), niah_single_2/3, niah_multikey (_1/_2/_3),
niah_multivalue, niah_multiquery, vt, cwe, ppl (perplexity of held-out text), ruler (every
synthetic task at every length). The default model is the README main job's workdir
(runs/tiny); by default a workdir is evaluated at its training length, a checkpoint at 4K-128K
up to its context. Results go to DIR/eval (a workdir) or --out."""

import argparse
import sys
from pathlib import Path

from l2a_jax.config import ConfigError
from l2a_jax.data import embedded_corpus, key_words, read_text_files, sentences
from l2a_jax.evals import (
    TASK_NAMES,
    EvalSettings,
    Materials,
    evaluate,
    evaluate_ruler,
    parse_lengths,
    summary_line,
    task_spec,
)
from l2a_jax.sources import load_model, workdir_config
from l2a_jax.weights import CheckpointError

RULER_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", required=True, help=", ".join(TASK_NAMES))
    source = p.add_mutually_exclusive_group()
    source.add_argument("--workdir", type=Path, help="a training workdir (default runs/tiny)")
    source.add_argument("--hf", type=Path, help="an HF-style checkpoint directory")
    p.add_argument("--lengths", help="token counts, e.g. 4k,8k,16k (k = 1024)")
    p.add_argument("--depths", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1")
    p.add_argument("--samples", type=int, default=10, help="per length (and depth for niah)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--scoring", default="generate", choices=("generate", "likelihood"))
    p.add_argument("--out", type=Path, help="default: WORKDIR/eval, or eval/ for --hf")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text", nargs="*", default=(), help="held-out text files (.txt/.jsonl/...)")
    p.add_argument("--tokenizer", help="bytes, qwen or a tokenizer directory (default: found)")
    p.add_argument("--dtype", help="bfloat16 on a GPU, float32 elsewhere by default")
    p.add_argument("--attention-impl", default="auto", choices=("auto", "xla", "pallas", "cudnn"))
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        if args.task not in ("ruler", "ppl"):
            task_spec(args.task)  # an unknown task fails before the model loads
        source = args.hf or args.workdir or Path("runs/tiny")
        model, tokenizer = load_model(
            source, dtype=args.dtype, attention_impl=args.attention_impl, tokenizer=args.tokenizer
        )
        saved = workdir_config(source)
        if args.lengths:
            lengths = parse_lengths(args.lengths)
        elif saved is not None:
            lengths = (int(saved["data"]["seq_len"]),)
        else:
            limit = model.cfg.max_position_embeddings
            lengths = tuple(n for n in RULER_LENGTHS if n <= limit) or (limit,)
        try:
            depths = tuple(float(d) for d in args.depths.split(","))
        except ValueError as e:
            raise ConfigError(f"depths {args.depths!r} are not numbers such as 0,0.5,1") from e
        settings = EvalSettings(
            lengths, depths, args.samples, args.batch_size, args.scoring, args.seed
        )
        held_out = read_text_files(list(args.text)) if args.text else embedded_corpus("heldout")
        materials = Materials(
            words=key_words(embedded_corpus(), 5000),
            essay=sentences(held_out),
            documents=held_out,
        )
        out = args.out or (source / "eval" if saved is not None else Path("eval"))
        if args.task == "ruler":
            result = evaluate_ruler(model, tokenizer, settings, materials, out, source=str(source))
            for n in lengths:
                print(f"ruler ({settings.scoring}) {n}: average {result['average'].get(str(n))}")
        else:
            result = evaluate(
                model, tokenizer, args.task, settings, materials, out, source=str(source)
            )
            print(summary_line(result))
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"results: {out}/")


if __name__ == "__main__":
    main()
