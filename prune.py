"""Prune the global branches of L2A layers that rarely route: ``python prune.py --workdir DIR
--threshold 0.05`` (or ``--kv-fraction 0.5`` / ``--kv-bytes N`` / ``--sweep 0.01,0.05,0.1``).

Measures each L2A layer's routed fraction over held-out text at ``--length``, removes the
chosen layers' global branches, writes the pruned model as an HF-style directory (its ``l2a``
section lists the pruned layers) with ``prune_report.json`` and ``routing.png`` beside it, and
prints KV bytes per token of context, perplexity at several lengths and niah accuracy (on the
same text and samples) before and after. ``--sweep`` reports that trade-off across thresholds
(``sweep.json``, a table, ``tradeoff.png``) instead of writing a model."""

import argparse
import json
import sys
from pathlib import Path

from l2a_jax import to_hf
from l2a_jax.config import ConfigError
from l2a_jax.convert import prune_global_branches
from l2a_jax.data import embedded_corpus, key_words, read_text_files, sentences
from l2a_jax.evals import EvalSettings, Materials, evaluate
from l2a_jax.evals.run import identity
from l2a_jax.generate import cache_size
from l2a_jax.pruning import choose_layers, measure_routing
from l2a_jax.sources import load_model, workdir_config
from l2a_jax.weights import CheckpointError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--workdir", type=Path, help="a training workdir (default runs/tiny)")
    source.add_argument("--hf", type=Path, help="an HF-style L2A checkpoint directory")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--threshold", type=float, help="prune layers routing less than this")
    how.add_argument("--kv-fraction", type=float, help="keep at most this share of KV bytes")
    how.add_argument("--kv-bytes", type=int, help="keep at most this many KV bytes per token")
    how.add_argument("--sweep", help="thresholds to compare, e.g. 0.01,0.05,0.1,0.2")
    p.add_argument("--length", type=int, help="tokens per measured window (default: training)")
    p.add_argument("--samples", type=int, default=8, help="windows of held-out text")
    p.add_argument("--niah-samples", type=int, default=4, help="niah samples per depth")
    p.add_argument("--scoring", default="likelihood", choices=("generate", "likelihood"))
    p.add_argument("--ppl-lengths", type=int, nargs="*", help="default: length / 4, / 2, 1")
    p.add_argument("--out", type=Path, help="where the pruned model (or the sweep) goes")
    p.add_argument("--text", nargs="*", default=(), help="held-out text files")
    p.add_argument("--tokenizer", help="bytes, qwen or a tokenizer directory (default: found)")
    p.add_argument("--dtype", help="bfloat16 on a GPU, float32 elsewhere by default")
    return p.parse_args(argv)


def _plot(routed: dict, pruned, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3))
    colors = ["tab:red" if i in pruned else "tab:blue" for i in routed]
    ax.bar([str(i) for i in routed], list(routed.values()), color=colors)
    ax.set_xlabel("layer (red: global branch pruned)")
    ax.set_ylabel("routed fraction")
    ax.set_title(title)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _scores(model, tokenizer, held_out, materials, args, length, out: Path, known=None) -> dict:
    """Perplexity at several lengths (``--ppl-lengths``, default a quarter, half and all of
    ``length``) and niah accuracy, on the same windows and samples for every model. ``known``:
    perplexities already measured for this model, by length."""
    lengths = args.ppl_lengths or sorted({max(length // 4, 2), max(length // 2, 2), length})
    known = known or {}
    ppl = {
        str(n): known[n]
        if n in known
        else measure_routing(model, tokenizer, held_out, length=n, samples=args.samples)[1]
        for n in lengths
    }
    settings = EvalSettings((length,), (0.0, 0.5, 1.0), args.niah_samples, 8, args.scoring)
    niah = evaluate(model, tokenizer, "niah", settings, materials, out, source=str(args.source))
    return {"perplexity": ppl, "niah": niah["accuracy_per_length"][0], "scoring": args.scoring}


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        args.source = args.hf or args.workdir or Path("runs/tiny")
        model, tokenizer = load_model(args.source, dtype=args.dtype, tokenizer=args.tokenizer)
        saved = workdir_config(args.source)
        length = args.length or (saved["data"]["seq_len"] if saved else 4096)
        held_out = read_text_files(list(args.text)) if args.text else embedded_corpus("heldout")
        materials = Materials(key_words(embedded_corpus(), 5000), sentences(held_out), held_out)
        routed, ppl = measure_routing(
            model, tokenizer, held_out, length=length, samples=args.samples
        )
        if args.sweep:
            out = args.out or (args.source / "prune_sweep" if saved else Path("prune_sweep"))
            _sweep(args, model, tokenizer, routed, ppl, length, held_out, materials, out)
            return
        layers = choose_layers(
            model, routed, threshold=args.threshold, kv_fraction=args.kv_fraction,
            kv_bytes_per_token=args.kv_bytes,
        )  # fmt: skip
        pruned = prune_global_branches(model, layers)
        out = args.out or (args.source / "pruned" if saved else Path(f"{args.source}-pruned"))
        to_hf(pruned, out)
        before, after = cache_size(model, length), cache_size(pruned, length)
        scores = {
            "before": _scores(
                model, tokenizer, held_out, materials, args, length, out / "eval_before",
                known={length: ppl},
            ),
            "after": _scores(
                pruned, tokenizer, held_out, materials, args, length, out / "eval_after"
            ),
        }  # fmt: skip
        report = {
            "model": identity(model, str(args.source), tokenizer),
            "length": length,
            "routed_fraction": {str(i): f for i, f in routed.items()},
            "pruned_layers": list(pruned.l2a.pruned_layers),
            "kv_bytes_per_token": {"before": before.per_token, "after": after.per_token},
            "kv_fixed_bytes": {"before": before.fixed, "after": after.fixed},
            "scores": scores,
        }
        (out / "prune_report.json").write_text(json.dumps(report, indent=1))
        title = f"{args.source}, {length} tokens"
        _plot(routed, pruned.l2a.pruned_layers, out / "routing.png", title)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    saved_share = 1 - after.per_token / max(before.per_token, 1)
    ppl = ", ".join(
        f"{n}: {scores['before']['perplexity'][n]:.3f} -> {scores['after']['perplexity'][n]:.3f}"
        for n in scores["before"]["perplexity"]
    )
    print(
        f"pruned layers {list(layers)}: KV {before.per_token} -> {after.per_token} bytes per "
        f"token ({saved_share:.0%} saved); perplexity by length {ppl}; niah "
        f"({args.scoring}) {scores['before']['niah']:.1f} -> {scores['after']['niah']:.1f}%; "
        f"wrote {out}"
    )


def _sweep(args, model, tokenizer, routed, ppl, length, held_out, materials, out: Path) -> None:
    """KV saved, perplexity and niah accuracy for each threshold, a table and a plot;
    thresholds that prune the same layers share one measurement."""
    out.mkdir(parents=True, exist_ok=True)
    measured = {}
    before = cache_size(model, length).per_token
    rows = []
    for threshold in [None, *[float(t) for t in args.sweep.split(",")]]:
        layers = () if threshold is None else choose_layers(model, routed, threshold=threshold)
        if layers not in measured:
            pruned = prune_global_branches(model, layers) if layers else model
            measured[layers] = (
                cache_size(pruned, length).per_token,
                _scores(
                    pruned, tokenizer, held_out, materials, args, length, out / f"t{threshold}",
                    known={} if layers else {length: ppl},
                ),
            )  # fmt: skip
        kv, scores = measured[layers]
        rows.append(
            {
                "threshold": threshold,
                "pruned_layers": list(layers),
                "kv_bytes_per_token": kv,
                "kv_saved": 1 - kv / max(before, 1),
                **scores,
            }
        )
    report = {"model": identity(model, str(args.source), tokenizer), "length": length,
              "routed_fraction": {str(i): f for i, f in routed.items()}, "rows": rows}  # fmt: skip
    (out / "sweep.json").write_text(json.dumps(report, indent=1))
    print("| threshold | pruned layers | KV bytes/token | KV saved | perplexity | niah % |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['threshold'] if r['threshold'] is not None else 'none'} | "
            f"{r['pruned_layers']} | {r['kv_bytes_per_token']} | {r['kv_saved']:.0%} | "
            f"{r['perplexity'][str(length)]:.3f} | {r['niah']:.1f} |"
        )
    _plot(routed, (), out / "routing.png", f"{args.source}, {length} tokens")
    _plot_tradeoff(rows, length, out / "tradeoff.png")


def _plot_tradeoff(rows, length: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    saved = [100 * r["kv_saved"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(saved, [r["perplexity"][str(length)] for r in rows], "o-", color="tab:blue")
    ax.set_xlabel("KV cache saved (% of bytes per token)")
    ax.set_ylabel(f"perplexity at {length} tokens", color="tab:blue")
    other = ax.twinx()
    other.plot(saved, [r["niah"] for r in rows], "s--", color="tab:red")
    other.set_ylabel(f"niah accuracy % ({rows[0]['scoring']})", color="tab:red")
    other.set_ylim(0, 100)
    for r, x in zip(rows, saved, strict=True):
        label = "none" if r["threshold"] is None else f"<{r['threshold']:g}"
        ax.annotate(label, (x, r["perplexity"][str(length)]), fontsize=7)
    ax.set_title("pruning global branches: memory against accuracy")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
