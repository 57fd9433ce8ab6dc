"""RULER's other synthetic tasks (definitions in EVAL.md): variable tracking and common words.

Variable tracking (``make_vt``): one chain of ``hops`` assignments, ``VAR ABCDE = 12345`` then
``VAR FGHIJ = VAR ABCDE`` and so on (names of 5 random upper-case letters, a 5-digit value),
its lines at random, ordered places in a ``noise`` haystack, after one worked example::

    Memorize and track the chain(s) of variable assignment hidden in the following text.

    {context}
    Question: Find all variables that are assigned the value {value} in the text above. Answer:
    According to the chain(s) of variable assignment in the text above, {n} variables are
    assigned the value {value}, they are:

and the answer is the chain's names, `` ABCDE FGHIJ ...``.

Common words (``make_cwe``): a numbered list (``1. word``) in which 10 words appear 30 times
each and the others 3 times (6 and 1 for lengths under 4096 tokens), shuffled, after one
worked example::

    Below is a numbered list of words. In these words, some appear more often than others.
    Memorize the ones that appear most often.
    {list}
    Question: What are the 10 most common words in the above list? Answer: The top 10 words
    that appear most often in the list are:

and the answer is `` w1, w2, ..., w10.``. Words come from the caller's list
(``needles.key_words``); when a long list needs more rare words than it has, hyphenated pairs
of them follow.
"""

from __future__ import annotations

import string

import numpy as np

from l2a_jax.config import ConfigError
from l2a_jax.data.needles import NOISE, TaskSample, fill, fit_count, too_short
from l2a_jax.data.tokenizers import Tokenizer

_VT_HEAD = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
)
_CWE_HEAD = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
)
COMMON_WORDS = 10


def _names(rng, count: int, avoid=()) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        name = "".join(rng.choice(list(string.ascii_uppercase), 5))
        if name not in out and name not in avoid:
            out.append(name)
    return out


def _vt_question(names: list[str], value: str) -> str:
    return (
        f"\nQuestion: Find all variables that are assigned the value {value} in the text above. "
        f"Answer: According to the chain(s) of variable assignment in the text above, "
        f"{len(names)} variables are assigned the value {value}, they are:"
    )


def _chain(names: list[str], value: str) -> list[str]:
    return [f"VAR {names[0]} = {value}."] + [
        f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:], strict=False)
    ]


def make_vt(
    rng: np.random.Generator,
    tokenizer: Tokenizer,
    length: int,
    *,
    hops: int = 4,
    num_distractors: int = 4,
    reserve: int = 0,
) -> TaskSample:
    """One variable-tracking task whose prompt plus answer fits ``length - reserve`` tokens."""
    example_names = _names(rng, 3)
    example_value = str(rng.integers(10_000, 100_000))
    example = (
        _VT_HEAD
        + " ".join([NOISE, *_chain(example_names, example_value)[:2], NOISE])
        + " "
        + _chain(example_names, example_value)[2]
        + _vt_question(example_names, example_value)
        + " "
        + " ".join(example_names)
        + "\n\n"
    )
    names = _names(rng, hops + 1, avoid=example_names)
    value = str(rng.integers(10_000, 100_000))
    chain = _chain(names, value)
    question = _vt_question(names, value)
    answer = " " + " ".join(names)
    budget = length - reserve - len(tokenizer.encode(example + _VT_HEAD + " ".join(chain)))
    budget -= len(tokenizer.encode(question + answer))
    if budget < 0:
        raise too_short(length - reserve, length - reserve - budget, "variable-tracking")
    filler, _ = fill(tokenizer, int(budget * 1.25) + 64, lambda i: NOISE)
    spots = np.sort(rng.random(len(chain)))  # fractions of the haystack

    def render(count: int) -> str:
        body, at = [], 0
        for spot, line in zip(spots, chain, strict=True):
            point = max(round(spot * count), at)
            body += filler[at:point] + [line]
            at = point
        return example + _VT_HEAD + " ".join(body + filler[at:count]) + question

    room = length - reserve - len(tokenizer.encode(answer))
    prompt = render(fit_count(tokenizer, room, render, len(filler)))
    distractors = tuple(
        " " + " ".join(_names(rng, hops + 1, avoid=names)) for _ in range(num_distractors)
    )
    return TaskSample(prompt, answer, tuple(names), distractors, None, (value,))


def _cwe_text(rng, common: list[str], others: list[str], freq: int, rare: int) -> str:
    listed = [w for w in common for _ in range(freq)] + [w for w in others for _ in range(rare)]
    order = rng.permutation(len(listed))
    return "\n".join(f"{i + 1}. {listed[j]}" for i, j in enumerate(order))


def _cwe_question() -> str:
    return (
        f"\nQuestion: What are the {COMMON_WORDS} most common words in the above list? Answer: "
        f"The top {COMMON_WORDS} words that appear most often in the list are:"
    )


def make_cwe(
    rng: np.random.Generator,
    tokenizer: Tokenizer,
    length: int,
    *,
    words: list[str],
    num_distractors: int = 4,
    reserve: int = 0,
) -> TaskSample:
    """One common-words task whose prompt plus answer fits ``length - reserve`` tokens."""
    if len(words) < 3 * COMMON_WORDS:
        raise ConfigError(f"common words needs at least {3 * COMMON_WORDS} distinct words")
    freq, rare = (30, 3) if length >= 4096 else (6, 1)
    pick = rng.permutation(len(words))
    example_common = [words[i] for i in pick[:COMMON_WORDS]]
    example_others = [words[i] for i in pick[COMMON_WORDS : 2 * COMMON_WORDS]]
    example = (
        _CWE_HEAD
        + _cwe_text(rng, example_common, example_others, 3, 1)
        + _cwe_question()
        + " "
        + ", ".join(example_common)
        + ".\n\n"
    )
    common = [words[i] for i in pick[2 * COMMON_WORDS : 3 * COMMON_WORDS]]
    rest = [words[i] for i in pick[3 * COMMON_WORDS :]]
    answer = " " + ", ".join(common) + "."
    fixed = example + _CWE_HEAD + _cwe_text(rng, common, [], freq, rare) + _cwe_question()
    budget = length - reserve - len(tokenizer.encode(fixed + answer))
    if budget < 0:
        raise too_short(length - reserve, length - reserve - budget, "common-words")

    def rare_word(i: int) -> str:  # single words first, then hyphenated pairs of them
        n = len(rest)
        return rest[i] if i < n else f"{rest[i % n]}-{rest[(i // n + i) % n]}"

    def render(count: int) -> str:
        items = [rare_word(i) for i in range(count)]
        listing = _cwe_text(np.random.default_rng([count, 7]), common, items, freq, rare)
        return example + _CWE_HEAD + listing + _cwe_question()

    room = length - reserve - len(tokenizer.encode(answer))
    count = fit_count(tokenizer, room, render, budget // max(rare, 1) + 1)
    prompt = render(count)
    kept = [rare_word(i) for i in range(count)]
    distractors = []
    for i in range(num_distractors):  # half the answer swapped for words listed rarely
        swap = list(common)
        for j in range(COMMON_WORDS // 2):
            if kept:
                swap[(i + 2 * j) % COMMON_WORDS] = kept[(i * 5 + j) % len(kept)]
        distractors.append(" " + ", ".join(swap) + ".")
    return TaskSample(prompt, answer, tuple(common), tuple(distractors), None, ())
