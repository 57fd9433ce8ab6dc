"""What a run shows: a progress bar (tqdm), ``metrics.jsonl``, TensorBoard event files
(tensorboardX, which needs no TensorFlow) and, at the end, a PNG of loss and per-layer
routed fractions (matplotlib)."""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

METRICS = "metrics.jsonl"


class MetricsLog:
    """Logged steps go to ``metrics.jsonl``, TensorBoard and the bar's postfix. On a resumed
    run, lines past the resumed step (written after the checkpoint by the run that stopped)
    are dropped, so the file reads as one uninterrupted run."""

    def __init__(self, workdir: Path, *, start: int, total: int, enabled: bool = True):
        self.enabled = enabled
        self.last_step = start
        if not enabled:  # another process writes the logs
            return
        from tensorboardX import SummaryWriter

        self.path = workdir / METRICS
        kept = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut short by a crash, and nothing after it is kept
                if record["step"] > start:
                    break
                kept.append(line)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)
        self.file = self.path.open("a")
        self.writer = SummaryWriter(str(workdir / "tensorboard"), purge_step=start + 1)
        self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def write(self, step: int, values: dict[str, float]) -> None:
        self.last_step = step
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        postfix = {"loss": f"{values['loss']:.3f}", "tok/s": f"{values['tokens_per_s']:.0f}"}
        if "routed_fraction" in values:
            postfix["routed"] = f"{values['routed_fraction']:.2f}"
        self.bar.set_postfix(postfix, refresh=False)

    def advance(self, step: int) -> None:
        if self.enabled:
            self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.writer.close()
        self.file.close()


def read_metrics(workdir: Path) -> list[dict]:
    path = Path(workdir) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(workdir: Path) -> Path:
    """``training.png``: loss over steps, and each L2A layer's routed fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(workdir)
    steps = [r["step"] for r in records]
    layers = sorted(
        {k for r in records for k in r if k.endswith("/routed_fraction")},
        key=lambda k: int(k.split("/")[0].removeprefix("layer")),
    )
    fig, (loss_ax, route_ax) = plt.subplots(1, 2, figsize=(11, 4))
    loss_ax.plot(steps, [r["cross_entropy"] for r in records], label="cross-entropy")
    loss_ax.plot(steps, [r["loss"] for r in records], label="loss (with regulariser)")
    loss_ax.set(xlabel="step", ylabel="nats per token", title="loss")
    loss_ax.legend()
    for key in layers:
        route_ax.plot(steps, [r[key] for r in records], label=key.split("/")[0])
    route_ax.set(xlabel="step", ylabel="fraction of tokens", ylim=(-0.02, 1.02))
    route_ax.set_title("routed to global attention")
    if layers:
        route_ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    out = Path(workdir) / "training.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
