"""Pictures of an evaluation (matplotlib, no display needed): the needle heatmap (accuracy by
length and depth, as NIAH plots are usually drawn), accuracy by length for other tasks,
perplexity by position for ``ppl``, and the routed fraction of every L2A layer."""

from __future__ import annotations

import os
from pathlib import Path


def _save(fig, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)


def plot_task(result: dict, out_dir: Path) -> list[Path]:
    """Writes ``{task}.png`` and, for an L2A model, ``{task}_routing.png``; returns them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task, written = result["task"], []
    fig, ax = plt.subplots(figsize=(8, 4))
    lengths = result["lengths"]
    if "depths" in result:
        grid = result["accuracy"]
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
        ax.set_xticks(range(len(result["depths"])), [f"{d:.0%}" for d in result["depths"]])
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_xlabel("needle depth (share of the haystack before it)")
        ax.set_ylabel("length (tokens)")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8)
        fig.colorbar(image, ax=ax, label="accuracy %")
    elif task == "ppl":
        for n, curve in zip(lengths, result["nll_by_position"], strict=True):
            xs = [(i + 0.5) * n / len(curve) for i in range(len(curve))]
            ax.plot(xs, curve, marker="o", label=f"length {n}")
        ax.set_xlabel("position (tokens)")
        ax.set_ylabel("mean NLL (nats per token)")
        ax.legend()
    else:
        ax.plot([str(n) for n in lengths], result["accuracy"], marker="o")
        ax.set_ylim(0, 100)
        ax.set_xlabel("length (tokens)")
        ax.set_ylabel("accuracy %")
    ax.set_title(f"{task} ({result['scoring']})")
    _save(fig, out_dir / f"{task}.png")
    written.append(out_dir / f"{task}.png")
    plt.close(fig)
    if result["routed_fraction"]:
        fig, ax = plt.subplots(figsize=(8, 3))
        layers = result["l2a_layers"] or list(range(len(result["routed_fraction"])))
        ax.bar([str(i) for i in layers], result["routed_fraction"])
        ax.set_ylim(0, 1)
        ax.set_xlabel("layer")
        ax.set_ylabel("routed fraction")
        ax.set_title(f"{task}: tokens routed to global attention")
        _save(fig, out_dir / f"{task}_routing.png")
        written.append(out_dir / f"{task}_routing.png")
        plt.close(fig)
    return written
