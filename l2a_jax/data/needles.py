"""Generated needle-in-a-haystack tasks in the RULER style (definitions in EVAL.md).

Needles ``One of the special magic {kinds} for {key} is: {value}.`` hide in a haystack, and the
prompt asks for the values of some keys::

    Some special magic {kinds} are hidden within the following text. Make sure to memorize it.
    I will quiz you about the {kinds} afterwards.
    {haystack with the needles}
    What is the special magic {kind} for {key} mentioned in the provided text? The special magic
    {kind} for {key} mentioned in the provided text is

with the plural wording (``What are all the special magic {kinds} for {query} ...
are``) when several values or keys are asked (queries joined as ``a, b, and c``). The answer
the model should continue with is `` {values joined by ", "}.``.

- Haystacks: ``noise`` (one line of plain sentences repeated), ``essay`` (consecutive
  sentences of real text), ``needle`` (the filler is itself needles with other keys).
- Keys: ``words`` (two words joined by a hyphen; words come from the text the caller passes,
  see ``key_words``) or ``uuids``. Values: ``numbers`` (7 digits), ``words`` or ``uuids``.
- ``num_keys`` needles with different keys, of which ``num_queries`` are asked; the asked key
  of a single query has ``num_values`` needles. The first asked needle sits at ``depth``
  (a fraction of the haystack's tokens, placed at the nearest sentence boundary); the others
  at random depths.

Lengths count tokens of the given tokenizer: prompt plus answer fit ``length - reserve``, with
as much haystack as fits.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import uuid
from collections.abc import Callable

import numpy as np

from l2a_jax.config import ConfigError
from l2a_jax.data.tokenizers import Tokenizer

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
HAYSTACKS = ("noise", "essay", "needle")
KEY_KINDS = ("words", "uuids")
VALUE_KINDS = {"numbers": "number", "words": "word", "uuids": "uuid"}


@dataclasses.dataclass(frozen=True)
class TaskSample:
    """One generated task. ``prompt`` ends with the answer prefix and the model should go on
    with ``answer``; ``expected`` are the strings a generated answer is scored on (the fraction
    found); ``distractors`` are wrong continuations of the answer's form (likelihood scoring);
    ``depth`` is where the (first asked) needle sits, a fraction of the filler's tokens."""

    prompt: str
    answer: str
    expected: tuple[str, ...]
    distractors: tuple[str, ...]
    depth: float | None = None
    keys: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return self.keys[0]

    @property
    def value(self) -> str:
        return self.expected[0]


def key_words(docs: list[str], count: int = 1000) -> list[str]:
    """The ``count`` most frequent lower-case words of 4-10 letters in ``docs``, ties broken
    alphabetically: a fixed vocabulary for keys and word values."""
    counts = collections.Counter(
        w for doc in docs for w in re.findall(r"\b[a-z]{4,10}\b", doc.lower())
    )
    return [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:count]]


def sentences(docs: list[str]) -> list[str]:
    """Sentences of ``docs``, whitespace folded: the material of ``essay`` haystacks."""
    out = []
    for doc in docs:
        out += [s for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())) if len(s) > 1]
    return out


def fill(
    tokenizer: Tokenizer, budget: int, next_item: Callable[[int], str]
) -> tuple[list[str], list[int]]:
    """Items ``next_item(i)`` for i = 0, 1, ... while their tokens (each counted with the
    space that joins it to the next) fit ``budget``: the items and their token counts."""
    items, costs, used = [], [], 0
    while True:
        item = next_item(len(items))
        cost = len(tokenizer.encode(item + " "))
        if used + cost > budget:
            return items, costs
        items.append(item)
        costs.append(cost)
        used += cost


def fit_count(tokenizer: Tokenizer, length: int, render: Callable[[int], str], most: int) -> int:
    """The largest n in [0, most] with ``render(n)`` at most ``length`` tokens (binary search;
    ``render`` grows with n)."""
    lo, hi = 0, most
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tokenizer.encode(render(mid))) <= length:
            lo = mid
        else:
            hi = mid - 1
    return lo


def too_short(length: int, needed: int, what: str) -> ConfigError:
    return ConfigError(
        f"a {what} task needs at least {needed} tokens of this tokenizer; {length} is too short"
    )


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + ", and " + names[-1]


def draw_value(rng, kind: str, words: list[str]) -> str:
    if kind == "numbers":
        return str(rng.integers(1_000_000, 10_000_000))
    if kind == "words":
        return words[rng.integers(len(words))]
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def _key(rng, kind: str, words: list[str]) -> str:
    if kind == "uuids":
        return draw_value(rng, "uuids", words)
    return f"{words[rng.integers(len(words))]}-{words[rng.integers(len(words))]}"


def _distinct(draw: Callable[[], str], count: int, avoid=()) -> list[str]:
    out: list[str] = []
    seen = set(avoid)
    for _ in range(100 * count + 100):
        if len(out) == count:
            return out
        x = draw()
        if x not in seen:
            out.append(x)
            seen.add(x)
    raise ConfigError(f"could not draw {count} distinct keys or values; give a larger word list")


def make_niah(
    rng: np.random.Generator,
    tokenizer: Tokenizer,
    length: int,
    *,
    words: list[str],
    haystack: str = "noise",
    key_kind: str = "words",
    value_kind: str = "numbers",
    num_keys: int = 1,
    num_values: int = 1,
    num_queries: int = 1,
    essay: list[str] | None = None,
    depth: float | None = None,
    num_distractors: int = 4,
    reserve: int = 0,
) -> TaskSample:
    """One needle task whose prompt plus answer fits ``length - reserve`` tokens (module
    docstring). ``depth`` in [0, 1] places the first asked needle (drawn when None)."""
    if haystack not in HAYSTACKS:
        raise ConfigError(f"haystack {haystack!r} is unknown; use one of {HAYSTACKS}")
    if key_kind not in KEY_KINDS:
        raise ConfigError(f"needle key kind {key_kind!r} is unknown; use one of {KEY_KINDS}")
    if value_kind not in VALUE_KINDS:
        raise ConfigError(f"needle value kind {value_kind!r} is unknown; use {list(VALUE_KINDS)}")
    if haystack == "essay" and not essay:
        raise ConfigError("an 'essay' haystack needs sentences of real text (essay=...)")
    if not 1 <= num_queries <= num_keys or (num_values > 1 and num_queries > 1):
        raise ConfigError("needles: 1 <= num_queries <= num_keys, and several values need 1 query")
    depth = float(rng.random()) if depth is None else float(depth)
    if not 0 <= depth <= 1:
        raise ConfigError(f"needle depth must be in [0, 1]; got {depth}")

    def value() -> str:
        return draw_value(rng, value_kind, words)

    keys = _distinct(lambda: _key(rng, key_kind, words), num_keys)
    values = {k: _distinct(value, num_values if i == 0 else 1) for i, k in enumerate(keys)}
    asked = keys[:num_queries]
    expected = [v for k in asked for v in values[k]]
    needles = [
        f"One of the special magic {value_kind} for {k} is: {v}." for k in keys for v in values[k]
    ]
    kind = VALUE_KINDS[value_kind]
    head = (
        f"Some special magic {value_kind} are hidden within the following text. Make sure to "
        f"memorize it. I will quiz you about the {value_kind} afterwards.\n"
    )
    if len(expected) == 1:
        tail = (
            f"\nWhat is the special magic {kind} for {asked[0]} mentioned in the provided text? "
            f"The special magic {kind} for {asked[0]} mentioned in the provided text is"
        )
    else:
        query = _join(asked)
        tail = (
            f"\nWhat are all the special magic {value_kind} for {query} mentioned in the "
            f"provided text? The special magic {value_kind} for {query} mentioned in the "
            "provided text are"
        )
    answer = " " + ", ".join(expected) + "."
    fixed = len(tokenizer.encode(head + " ".join(needles) + " " + tail + answer))
    budget = length - reserve - fixed
    if budget < 0:
        raise too_short(length - reserve, length - reserve - budget, "needle")
    # filler drawn generously (per-item counts overestimate a BPE text's), then cut to fit
    generous = int(budget * 1.25) + 64
    if haystack == "noise":
        filler, item_costs = fill(tokenizer, generous, lambda i: NOISE)
    elif haystack == "essay":
        start = int(rng.integers(len(essay)))
        filler, item_costs = fill(tokenizer, generous, lambda i: essay[(start + i) % len(essay)])
    else:  # distractor needles with keys and values of their own

        def decoy(i: int) -> str:
            k = _distinct(lambda: _key(rng, key_kind, words), 1, avoid=keys)[0]
            return f"One of the special magic {value_kind} for {k} is: {value()}."

        filler, item_costs = fill(tokenizer, generous, decoy)
    # distractor answers: values present in the text under other keys first (retrieval, not
    # mere copying, tells them apart), then fresh values of the same kind
    others = [v for k in keys[num_queries:] for v in values[k]]
    if haystack == "needle":
        others += [s.rsplit(": ", 1)[1][:-1] for s in filler[: 4 * num_distractors]]
    pool = _distinct(value, 4 * num_distractors + len(expected), avoid=expected + others)
    candidates = others + pool
    distractors = []
    for i in range(num_distractors):
        n = len(expected)
        swapped = [candidates[(i * n + j) % len(candidates)] for j in range(n)]
        distractors.append(" " + ", ".join(swapped) + ".")
    # needle 0 (the first asked) at ``depth``, the others at random depths: the sentence
    # boundaries nearest to those fractions of the kept filler's tokens
    costs = np.cumsum([0, *item_costs])
    spots = [depth] + [float(rng.random()) for _ in needles[1:]]

    def placement(count: int) -> list[tuple[int, int, str]]:
        kept = costs[: count + 1]
        return sorted(
            (int(np.argmin(np.abs(kept - d * kept[-1]))), n, needle)
            for n, (needle, d) in enumerate(zip(needles, spots, strict=True))
        )

    def render(count: int, items=filler) -> str:
        body, at = [], 0
        for point, _, needle in placement(count):
            body += items[at:point] + [needle]
            at = point
        return head + " ".join(body + items[at:count]) + tail

    room = length - reserve - len(tokenizer.encode(answer))
    count = fit_count(tokenizer, room, render, len(filler))
    if haystack != "needle" and count < len(filler):
        # top up with the words of the next sentence that still fit (a decoy needle is never
        # cut: a broken one would be a wrong needle)
        words_left = filler[count].split()

        def render_part(k: int) -> str:
            return render(count + 1, [*filler[:count], " ".join(words_left[:k])])

        part = fit_count(tokenizer, room, render_part, len(words_left))
        if part:
            filler = [*filler[:count], " ".join(words_left[:part])]
            count += 1
    point = next(p for p, n, _ in placement(count) if n == 0)
    placed_depth = float(costs[point] / max(costs[count], 1))
    return TaskSample(
        render(count, filler), answer, tuple(expected), tuple(distractors), placed_depth,
        tuple(asked),
    )  # fmt: skip
