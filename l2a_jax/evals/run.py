"""Running an evaluation task over lengths (and needle depths), writing what it found.

Per task ``out/{task}.json``: ``task``, ``scoring``, ``lengths``, ``depths`` (needle tasks),
``accuracy`` (percent; lengths x depths for needle tasks, one value per length otherwise;
``ppl`` reports ``perplexity`` instead), ``samples`` (per cell), ``routed_fraction`` (one value
per L2A layer, token-weighted over every prompt; empty for a base model), ``seconds_per_sample``
per length, the model's and the run's identity, date, device and versions; plus PNGs (see
``plots.py``). Files are written atomically. Every finished cell (a length, or a length and a
depth) is appended to ``out/{task}.partial.jsonl`` first, so an interrupted run started again
with the same settings resumes after its last finished cell.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from l2a_jax.config import ConfigError
from l2a_jax.data.corpus import token_windows
from l2a_jax.data.tokenizers import Tokenizer
from l2a_jax.evals.scoring import (
    GENERATION_SLACK,
    SCORINGS,
    generation_budget,
    score_generate,
    score_likelihood,
    token_nll,
)
from l2a_jax.evals.tasks import RULER_TASKS, Materials, task_spec
from l2a_jax.model import QwenModel

DEFAULT_DEPTHS = tuple(round(i / 10, 1) for i in range(11))
POSITION_BUCKETS = 16


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What one evaluation run does. ``samples``: per length and depth for needle tasks, per
    length otherwise (for ``ppl``: sequences of held-out text per length)."""

    lengths: tuple[int, ...]
    depths: tuple[float, ...] = DEFAULT_DEPTHS
    samples: int = 10
    batch_size: int = 8
    scoring: str = "generate"
    seed: int = 0

    def __post_init__(self):
        if self.scoring not in SCORINGS:
            raise ConfigError(f"scoring {self.scoring!r} is unknown; use one of {SCORINGS}")
        if not self.lengths or min(self.lengths) < 2:
            raise ConfigError(f"lengths must be token counts >= 2; got {self.lengths}")
        if not self.depths or any(not 0 <= d <= 1 for d in self.depths):
            raise ConfigError(f"depths must lie in [0, 1]; got {self.depths}")
        if self.samples < 1 or self.batch_size < 1:
            raise ConfigError("samples and batch size must be >= 1")


def parse_lengths(text: str) -> tuple[int, ...]:
    """``"1k,2k,4096"`` -> (1024, 2048, 4096): ``k`` is 1024 tokens, as RULER's 4K is 4096."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        try:
            out.append(int(float(part[:-1]) * 1024) if part.endswith("k") else int(part))
        except ValueError as e:
            raise ConfigError(f"length {part!r} is not a token count such as 4096 or 4k") from e
    return tuple(out)


def check_lengths(model: QwenModel, lengths) -> None:
    """A length above the model's context is refused before any work starts."""
    limit = model.cfg.max_position_embeddings
    over = [n for n in lengths if n > limit]
    if over and model.cfg.rope.rope_type != "dynamic":
        raise ConfigError(
            f"lengths {over} exceed the model's context of {limit} tokens; evaluate at most "
            f"{limit}, or extend the model's context first"
        )


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def identity(model: QwenModel, source: str, tokenizer: Tokenizer) -> dict:
    cfg = model.cfg
    return {
        "source": str(source),
        "architecture": cfg.architecture,
        "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "context": cfg.max_position_embeddings,
        "dtype": str(model.embed[...].dtype),
        "l2a": None if model.l2a is None else model.l2a.to_dict(),
        "tokenizer": tokenizer.name,
        "attention": model.attention.describe(),
    }


class _Progress:
    """Finished cells of one run, kept in a JSONL file that starts with the run's header."""

    def __init__(self, path: Path, header: dict):
        self.path, self.cells = path, {}
        header = json.loads(json.dumps(header))  # as it reads back: tuples become lists
        parsed = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    parsed.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short, and nothing after it is kept
                    break
        if parsed and parsed[0] == header:  # the same run: keep its finished cells
            self.cells = {tuple(r["cell"]): r for r in parsed[1:]}
        _atomic_write(path, "".join(json.dumps(x) + "\n" for x in [header, *self.cells.values()]))

    def add(self, record: dict) -> None:
        self.cells[tuple(record["cell"])] = record
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _cells(task: str, settings: EvalSettings):
    if task == "ppl" or not task_spec(task).has_depth:
        return [(n, None) for n in settings.lengths]
    return [(n, d) for n in settings.lengths for d in settings.depths]


def _run_cell(model, tokenizer, task, settings, materials, cell, bar) -> dict:
    length, depth = cell
    start = time.perf_counter()
    d_index = -1 if depth is None else settings.depths.index(depth)
    rng = np.random.default_rng([settings.seed, length, d_index + 1, sum(map(ord, task))])
    routed_sum, tokens, scores = None, 0, []

    def take(routed, n):
        nonlocal routed_sum, tokens
        if routed is not None:
            routed_sum = routed * n if routed_sum is None else routed_sum + routed * n
        tokens += n

    if task == "ppl":
        stream = token_windows(tokenizer, materials.documents, length, settings.samples)
        nll_sum = np.zeros(length - 1)
        for i in range(0, len(stream), settings.batch_size):
            batch = np.asarray(stream[i : i + settings.batch_size])
            nll, routed = token_nll(model, batch)
            nll_sum += nll.sum(axis=0)
            take(routed, batch.size)
            bar.update(len(batch))
        record = {"nll_by_position": (nll_sum / len(stream)).tolist(), "sequences": len(stream)}
    else:
        spec = task_spec(task)
        # for generation, prompts leave the slack beyond the answer free within the length
        reserve = 0 if settings.scoring == "likelihood" else GENERATION_SLACK
        samples = [
            spec.sample(rng, tokenizer, length, materials, depth=depth, reserve=reserve)
            for _ in range(settings.samples)
        ]
        prompts = [tokenizer.encode(s.prompt) for s in samples]  # once: long prompts are slow
        longest = max(map(len, prompts))
        budget = min(generation_budget(tokenizer, samples, spec.max_new_tokens), length - longest)
        outputs = []
        for i in range(0, len(samples), settings.batch_size):
            batch = samples[i : i + settings.batch_size]
            ids = prompts[i : i + settings.batch_size]
            if settings.scoring == "generate":
                s, out, routed, n = score_generate(
                    model, tokenizer, batch, ids, width=length - budget, budget=budget
                )
                outputs += out
            else:
                s, routed, n = score_likelihood(model, tokenizer, batch, ids)
            scores += s
            take(routed, n)
            bar.update(len(batch))
        record = {
            "scores": scores,
            "depths_placed": [s.depth for s in samples],
            "prompt_tokens": [len(p) for p in prompts],
            "example": {"prompt_end": samples[0].prompt[-200:], "answer": samples[0].answer}
            | ({"output": outputs[0]} if outputs else {}),
        }
    record |= {
        "cell": [length, depth],
        "routed_sum": None if routed_sum is None else routed_sum.tolist(),
        "tokens": tokens,
        "seconds": time.perf_counter() - start,
    }
    return record


def evaluate(
    model: QwenModel,
    tokenizer: Tokenizer,
    task: str,
    settings: EvalSettings,
    materials: Materials,
    out_dir: Path,
    *,
    source: str = "",
) -> dict:
    """Runs one task (not ``ruler``: see ``evaluate_ruler``) and writes its JSON and plots;
    returns the JSON's content."""
    from l2a_jax.evals.plots import plot_task

    if task != "ppl":
        task_spec(task)  # unknown names fail before any work
    check_lengths(model, settings.lengths)
    out_dir.mkdir(parents=True, exist_ok=True)
    scoring = "perplexity" if task == "ppl" else settings.scoring
    header = {
        "task": task,
        "settings": dataclasses.asdict(settings),
        "model": identity(model, source, tokenizer),
    }
    progress = _Progress(out_dir / f"{task}.partial.jsonl", header)
    cells = _cells(task, settings)
    per_cell = settings.samples
    todo = [c for c in cells if tuple(c) not in progress.cells]
    with tqdm(total=len(cells) * per_cell, desc=task, unit="sample") as bar:
        bar.update((len(cells) - len(todo)) * per_cell)
        for cell in todo:
            progress.add(_run_cell(model, tokenizer, task, settings, materials, cell, bar))
    records = {tuple(r["cell"]): r for r in progress.cells.values()}
    result = _summarise(task, scoring, settings, records, header["model"])
    _atomic_write(out_dir / f"{task}.json", json.dumps(result, indent=1))
    plot_task(result, out_dir)
    progress.path.unlink()
    return result


def _summarise(task, scoring, settings: EvalSettings, records: dict, model: dict) -> dict:
    lengths = list(settings.lengths)
    routed_sum, tokens = None, 0
    for r in records.values():
        if r["routed_sum"] is not None:
            s = np.asarray(r["routed_sum"])
            routed_sum = s if routed_sum is None else routed_sum + s
        tokens += r["tokens"]
    result = {
        "task": task,
        "scoring": scoring,
        "lengths": lengths,
        "samples": settings.samples,
        "routed_fraction": [] if routed_sum is None else (routed_sum / tokens).tolist(),
        "l2a_layers": [] if model["l2a"] is None else _l2a_layers(model),
        "seconds_per_sample": [
            sum(r["seconds"] for c, r in records.items() if c[0] == n)
            / (settings.samples * sum(1 for c in records if c[0] == n))
            for n in lengths
        ],
        "model": model,
        "settings": dataclasses.asdict(settings),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": jax.devices()[0].device_kind,
        "versions": _versions(),
    }
    if task == "ppl":
        curves = [np.asarray(records[(n, None)]["nll_by_position"]) for n in lengths]
        result["perplexity"] = [math.exp(float(c.mean())) for c in curves]
        result["nll_by_position"] = [
            [float(x.mean()) for x in np.array_split(c, POSITION_BUCKETS)] for c in curves
        ]
        return result
    if task_spec(task).has_depth:
        result["depths"] = list(settings.depths)
        result["accuracy"] = [
            [100 * float(np.mean(records[(n, d)]["scores"])) for d in settings.depths]
            for n in lengths
        ]
        result["accuracy_per_length"] = [float(np.mean(row)) for row in result["accuracy"]]
    else:
        result["accuracy"] = [100 * float(np.mean(records[(n, None)]["scores"])) for n in lengths]
        result["accuracy_per_length"] = result["accuracy"]
    result["examples"] = [records[c]["example"] for c in sorted(records, key=str)[:3]]
    return result


def _l2a_layers(model: dict) -> list[int]:
    from l2a_jax.config import L2AConfig

    l2a = L2AConfig.from_dict(model["l2a"])
    return sorted(l2a.layer_modes(model["layers"]))


def _versions() -> dict:
    import flax

    return {"jax": jax.__version__, "flax": flax.__version__}


def summary_line(result: dict) -> str:
    """One line: task, scoring and the headline number per length."""
    if result["task"] == "ppl":
        values = result["perplexity"]
        what = "perplexity"
    else:
        values = result["accuracy_per_length"]
        what = "accuracy %"
    per_length = ", ".join(f"{n}: {v:.1f}" for n, v in zip(result["lengths"], values, strict=True))
    routed = result["routed_fraction"]
    tail = f"; routed {np.mean(routed):.3f} mean over {len(routed)} L2A layers" if routed else ""
    return f"{result['task']} ({result['scoring']}) {what} by length: {per_length}{tail}"


def evaluate_ruler(
    model, tokenizer, settings: EvalSettings, materials, out_dir: Path, *, source=""
) -> dict:
    """Every RULER task at every length; tasks a length is too short for are left out of that
    length's average and listed under ``skipped``. Writes ``ruler.json`` with the table."""
    check_lengths(model, settings.lengths)
    table, skipped = {}, {}
    for name in RULER_TASKS:
        fits = []
        for n in settings.lengths:
            try:
                task_spec(name).sample(np.random.default_rng(0), tokenizer, n, materials)
                fits.append(n)
            except ConfigError as e:
                skipped.setdefault(name, {})[n] = str(e)
        if not fits:
            continue
        result = evaluate(
            model, tokenizer, name, dataclasses.replace(settings, lengths=tuple(fits)),
            materials, out_dir, source=source,
        )  # fmt: skip
        table[name] = dict(zip(fits, result["accuracy_per_length"], strict=True))
    average = {
        n: float(np.mean([row[n] for row in table.values() if n in row]))
        for n in settings.lengths
        if any(n in row for row in table.values())
    }
    result = {
        "task": "ruler",
        "scoring": settings.scoring,
        "lengths": list(settings.lengths),
        "table": {k: {str(n): v for n, v in row.items()} for k, row in table.items()},
        "average": {str(n): v for n, v in average.items()},
        "skipped": {k: {str(n): why for n, why in v.items()} for k, v in skipped.items()},
        "model": identity(model, source, tokenizer),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": jax.devices()[0].device_kind,
        "versions": _versions(),
    }
    _atomic_write(out_dir / "ruler.json", json.dumps(result, indent=1))
    return result
