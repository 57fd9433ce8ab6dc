"""Generated needle-in-a-haystack tasks in the RULER style (definitions in EVAL.md).

A needle ``One of the special magic {kinds} for {key} is: {value}.`` is hidden at a depth in a
haystack, and the prompt asks for the value of that key::

    Some special magic {kinds} are hidden within the following text. Make sure to memorize it.
    I will quiz you about the {kinds} afterwards.
    {haystack with the needle}
    What is the special magic {kind} for {key} mentioned in the provided text? The special magic
    {kind} for {key} mentioned in the provided text is

and the answer is `` {value}.``. Haystacks: ``noise`` (one line of plain sentences repeated) or
``essay`` (consecutive sentences of real text). Values: ``numbers`` (7 digits), ``words`` or
``uuids``. Keys are two words joined by a hyphen; words come from the text the caller passes
(``key_words``), the embedded corpus by default. Lengths count tokens of the given tokenizer.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import uuid

import numpy as np

from l2a_jax.config import ConfigError
from l2a_jax.data.tokenizers import Tokenizer

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
HAYSTACKS = ("noise", "essay")
VALUE_KINDS = {"numbers": "number", "words": "word", "uuids": "uuid"}


@dataclasses.dataclass(frozen=True)
class NeedleTask:
    """``prompt`` ends with the answer prefix; the model should continue with ``answer``."""

    prompt: str
    answer: str
    key: str
    value: str
    depth: float


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


def make_needle_task(
    rng: np.random.Generator,
    tokenizer: Tokenizer,
    length: int,
    *,
    words: list[str],
    haystack: str = "noise",
    value_kind: str = "numbers",
    essay: list[str] | None = None,
    depth: float | None = None,
) -> NeedleTask:
    """One task whose prompt plus answer is at most ``length`` tokens, filled with as much
    haystack as fits. ``depth`` in [0, 1] places the needle (drawn when None)."""
    if haystack not in HAYSTACKS:
        raise ConfigError(f"haystack {haystack!r} is unknown; use one of {HAYSTACKS}")
    if value_kind not in VALUE_KINDS:
        raise ConfigError(f"needle value kind {value_kind!r} is unknown; use {list(VALUE_KINDS)}")
    if haystack == "essay" and not essay:
        raise ConfigError("an 'essay' haystack needs sentences of real text (essay=...)")
    kind = VALUE_KINDS[value_kind]
    key = f"{words[rng.integers(len(words))]}-{words[rng.integers(len(words))]}"
    if value_kind == "numbers":
        value = str(rng.integers(1_000_000, 10_000_000))
    elif value_kind == "words":
        value = words[rng.integers(len(words))]
    else:
        value = str(uuid.UUID(bytes=rng.bytes(16), version=4))
    depth = float(rng.random()) if depth is None else depth
    head = (
        f"Some special magic {value_kind} are hidden within the following text. Make sure to "
        f"memorize it. I will quiz you about the {value_kind} afterwards.\n"
    )
    needle = f"One of the special magic {value_kind} for {key} is: {value}."
    tail = (
        f"\nWhat is the special magic {kind} for {key} mentioned in the provided text? "
        f"The special magic {kind} for {key} mentioned in the provided text is"
    )
    answer = f" {value}."
    budget = length - len(tokenizer.encode(head + needle + " " + tail + answer))
    if budget < 0:
        raise ConfigError(
            f"a needle task needs at least {length - budget} tokens of this tokenizer; "
            f"{length} is too short"
        )
    if haystack == "noise":
        source, start = [NOISE], 0
    else:
        source, start = essay, int(rng.integers(len(essay)))
    filler: list[str] = []
    used = 0
    while True:
        sentence = source[(start + len(filler)) % len(source)]
        cost = len(tokenizer.encode(sentence + " "))
        if used + cost > budget:
            break
        filler.append(sentence)
        used += cost
    while True:  # sentence by sentence counts can differ from the whole text's by a token
        at = round(depth * len(filler))
        prompt = head + " ".join([*filler[:at], needle, *filler[at:]]) + tail
        if not filler or len(tokenizer.encode(prompt + answer)) <= length:
            return NeedleTask(prompt, answer, key, value, depth)
        filler.pop()
