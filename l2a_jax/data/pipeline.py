"""Training batches with grain: documents tokenized, packed into fixed-length rows, mixed
with generated needle tasks, batched.

- Corpus rows: documents shuffled (``seed``), repeated without end, tokenized with an
  end-of-document id after each, concatenated and cut into rows of ``seq_len`` tokens. Each
  row carries segment ids (one per document piece) and positions that restart at 0 per piece.
- Needle rows (a ``needle_rate`` fraction of rows): one generated task per row, as long as fits
  (``needles.py``), padded with segment id 0.
- Recall drills (a ``drill_rate`` fraction of rows): short documents packed into a row, each
  random letters with one value (a needle's value kind) whose last token lies at least
  ``drill_gap`` tokens before the ``?`` that ends it, then the value again::

      qhd wkz 4546580 oe yvtbq ... rj? 4546580.

  Only the repeated value (and the end-of-document id) is trained. A 512-token row holds about
  ten such retrievals where a needle row holds one, which lets a small model trained from
  scratch learn to copy from far back within a few thousand steps.
- ``loss_mask`` is 1 on targets inside a segment: padding and the first token of every
  segment (which the previous document cannot predict) are not scored.

Everything is a deterministic function of ``seed`` and the process index, and the iterator's
position is a small JSON-able state (``get_state``/``set_state``) that checkpoints save, so a
resumed run reads exactly the batches it would have read. With several processes each reads
its own shard of the documents and draws its own tasks.
"""

from __future__ import annotations

import dataclasses

import grain
import grain.experimental as grain_exp
import numpy as np

from l2a_jax.config import ConfigError
from l2a_jax.data.needles import (
    HAYSTACKS,
    VALUE_KINDS,
    draw_value,
    key_words,
    make_niah,
    sentences,
)
from l2a_jax.data.tokenizers import Tokenizer

NEEDLE_LOSSES = ("all", "answer")


@dataclasses.dataclass(frozen=True)
class NeedleMix:
    """Generated tasks mixed into training: ``rate`` of the rows; haystack and value kinds
    are drawn per task from the given tuples. ``loss``: ``all`` trains on every token of a
    task row, ``answer`` on its answer alone (and the end-of-document id), as completions
    are trained: the gradient then goes to retrieval, not to predicting the haystack."""

    rate: float = 0.0
    haystacks: tuple[str, ...] = ("noise", "essay")
    value_kinds: tuple[str, ...] = ("numbers",)
    loss: str = "all"
    drill_rate: float = 0.0
    drill_length: int = 48
    drill_gap: int = 16

    def __post_init__(self):
        if not 0 <= self.rate < 1:
            raise ConfigError(f"needle rate must be in [0, 1), got {self.rate}")
        if not 0 <= self.drill_rate < 1 or self.rate + self.drill_rate >= 1:
            raise ConfigError(
                f"drill rate must be in [0, 1) and leave corpus rows beside the needle rate; "
                f"got drill rate {self.drill_rate} with needle rate {self.rate}"
            )
        if self.drill_gap < 0 or self.drill_length < self.drill_gap + 24:
            raise ConfigError(
                f"a drill needs drill_length >= drill_gap + 24 tokens and drill_gap >= 0; got "
                f"drill_length {self.drill_length}, drill_gap {self.drill_gap}"
            )
        bad = [h for h in self.haystacks if h not in HAYSTACKS]
        bad += [v for v in self.value_kinds if v not in VALUE_KINDS]
        if bad or not self.haystacks or not self.value_kinds:
            raise ConfigError(
                f"needle haystacks must come from {HAYSTACKS} and value kinds from "
                f"{tuple(VALUE_KINDS)}; got {self.haystacks}, {self.value_kinds}"
            )
        if self.loss not in NEEDLE_LOSSES:
            raise ConfigError(f"needle loss {self.loss!r} is unknown; use one of {NEEDLE_LOSSES}")


def _row(tokens, segment_ids, positions) -> dict[str, np.ndarray]:
    segment_ids = np.asarray(segment_ids, np.int32)
    positions = np.asarray(positions, np.int32)
    return {
        "input_ids": np.asarray(tokens, np.int32),
        "positions": positions,
        "segment_ids": segment_ids,
        "loss_mask": ((segment_ids > 0) & (positions > 0)).astype(np.float32),
    }


class _JsonRestorable(grain.IterDataset):
    """A concat-then-split packer whose saved state survives JSON. Its state marks "no
    remainder" with the tuple (-1, -1), and a checkpoint reads that back as a list, which the
    packer takes for a real remainder: a run restored before the packer's first row skipped a
    document. This puts the tuples back before the packer sees the state."""

    def __iter__(self):
        return _JsonRestorableIterator(self._parent.__iter__())


class _JsonRestorableIterator(grain.DatasetIterator):
    def __next__(self):
        return next(self._parent)

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        slices = {k: tuple(v) for k, v in state["remainder_slices"].items()}
        self._parent.set_state({**state, "remainder_slices": slices})


def _corpus_rows(docs, tokenizer: Tokenizer, seq_len: int, seed: int) -> grain.IterDataset:
    def tokenize(doc: str):
        return {"tokens": np.asarray([*tokenizer.encode(doc), tokenizer.eos_id], np.int32)}

    def as_row(packed):
        return _row(packed["tokens"], packed["tokens_segment_ids"], packed["tokens_positions"])

    docs = grain.MapDataset.source(docs).shuffle(seed=seed).repeat(None).map(tokenize)
    packed = _JsonRestorable(
        grain_exp.ConcatThenSplitIterDataset(
            docs.to_iter_dataset(), length_struct={"tokens": seq_len}
        )
    )
    return packed.map(as_row)


def _needle_rows(
    tokenizer: Tokenizer, seq_len: int, seed: int, mix: NeedleMix, words, essay
) -> grain.IterDataset:
    def make(index: int):
        rng = np.random.default_rng([seed, index])
        task = make_niah(
            rng,
            tokenizer,
            seq_len - 1,  # room for the end-of-document id
            words=words,
            haystack=mix.haystacks[rng.integers(len(mix.haystacks))],
            value_kind=mix.value_kinds[rng.integers(len(mix.value_kinds))],
            essay=essay,
        )
        ids = [*tokenizer.encode(task.prompt + task.answer), tokenizer.eos_id]
        pad = seq_len - len(ids)
        row = _row(
            ids + [tokenizer.eos_id] * pad,
            [1] * len(ids) + [0] * pad,
            list(range(len(ids))) + [0] * pad,
        )
        if mix.loss == "answer":  # the mask marks targets: the answer's tokens and the eos
            row["loss_mask"][: len(tokenizer.encode(task.prompt))] = 0.0
        return row

    make(0)  # a row length too short for a task fails here, not in the middle of training
    return grain.MapDataset.range(2**31 - 1).map(make).to_iter_dataset()


LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))


def _letters(rng, count: int) -> str:
    """``count`` characters of random lower-case "words" of 1-6 letters (``count`` - 1 when
    the cut falls on a space)."""
    out = ""
    while len(out) < count:
        out += "".join(rng.choice(LETTERS, rng.integers(1, 7))) + " "
    return out[:count].strip()


def make_drill(rng, tokenizer: Tokenizer, mix: NeedleMix, words) -> tuple[list[int], int]:
    """One recall drill (module docstring) of about ``mix.drill_length`` tokens: its ids
    (ending with the end-of-document id) and how many of them, at the end, are trained."""
    value = draw_value(rng, mix.value_kinds[rng.integers(len(mix.value_kinds))], words)
    answer = tokenizer.encode(f" {value}.")
    room = mix.drill_length - 2 * len(answer) - 3  # letters before and after the value
    after = int(rng.integers(mix.drill_gap, max(mix.drill_gap, room) + 1))
    text = f"{_letters(rng, room - after)} {value} {_letters(rng, after)}?"
    return [*tokenizer.encode(text), *answer, tokenizer.eos_id], len(answer) + 1


def _drill_rows(tokenizer: Tokenizer, seq_len: int, seed: int, mix: NeedleMix, words):
    def make(index: int):
        rng = np.random.default_rng([seed, 1, index])
        ids, segments, positions, trained = [], [], [], []
        while True:
            drill, answer = make_drill(rng, tokenizer, mix, words)
            if len(ids) + len(drill) > seq_len:
                break
            segments += [(segments[-1] if segments else 0) + 1] * len(drill)
            positions += range(len(drill))
            trained += [0] * (len(drill) - answer) + [1] * answer
            ids += drill
        pad = seq_len - len(ids)
        row = _row(ids + [tokenizer.eos_id] * pad, segments + [0] * pad, positions + [0] * pad)
        row["loss_mask"] *= np.asarray(trained + [0] * pad, np.float32)
        return row

    if make(0)["segment_ids"].max() < 1:
        raise ConfigError(f"a recall drill of {mix.drill_length} tokens does not fit {seq_len}")
    return grain.MapDataset.range(2**31 - 1).map(make).to_iter_dataset()


def training_batches(
    docs: list[str],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    needles: NeedleMix = NeedleMix(),
    words: list[str] | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """Batches of ``batch_size`` rows of ``seq_len``: dicts of (batch, seq) arrays
    ``input_ids``, ``positions``, ``segment_ids`` (int32) and ``loss_mask`` (float32).
    ``words`` (keys and word values of needle tasks) default to the documents' own."""
    if seq_len < 2 or batch_size < 1:
        raise ConfigError(f"seq_len must be >= 2 and batch_size >= 1; got {seq_len}, {batch_size}")
    shard = docs[process_index::process_count]
    if not shard:
        raise ConfigError(
            f"{len(docs)} documents cannot feed {process_count} processes; give more documents"
        )
    seed = int(np.random.default_rng([seed, process_index]).integers(2**31))
    rows = _corpus_rows(shard, tokenizer, seq_len, seed)
    words = words or (key_words(shard) if needles.rate or needles.drill_rate else None)
    sources, weights = [rows], [1 - needles.rate - needles.drill_rate]
    if needles.rate > 0:
        essay = sentences(shard) if "essay" in needles.haystacks else None
        sources.append(_needle_rows(tokenizer, seq_len, seed, needles, words, essay))
        weights.append(needles.rate)
    if needles.drill_rate > 0:
        sources.append(_drill_rows(tokenizer, seq_len, seed, needles, words))
        weights.append(needles.drill_rate)
    if len(sources) > 1:
        rows = grain.IterDataset.mix(sources, weights)
    return rows.batch(batch_size, drop_remainder=True)
