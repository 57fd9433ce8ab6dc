"""The evaluation tasks by name: RULER's synthetic tasks (EVAL.md) built by ``data.needles``
and ``data.synthetic``, plus perplexity (``ppl``) and the whole RULER set (``ruler``).

| name | haystack | keys -> values | needles |
|---|---|---|---|
| niah_single_1 (``niah``) | noise | words -> 7-digit numbers | 1 |
| niah_single_2 | essay | words -> numbers | 1 |
| niah_single_3 | essay | words -> UUIDs | 1 |
| niah_multikey_1 (``niah_multikey``) | essay | words -> numbers | 4 keys, 1 asked |
| niah_multikey_2 | other needles | words -> numbers | 1 asked |
| niah_multikey_3 | other needles | UUIDs -> UUIDs | 1 asked |
| niah_multivalue | essay | words -> numbers | 1 key, 4 values |
| niah_multiquery | essay | words -> numbers | 4 keys, all asked |
| vt | noise | a chain of 4 assignments | |
| cwe | numbered word list | the 10 most common words | |
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from l2a_jax.config import ConfigError
from l2a_jax.data.needles import TaskSample, make_niah
from l2a_jax.data.synthetic import make_cwe, make_vt
from l2a_jax.data.tokenizers import Tokenizer


@dataclasses.dataclass(frozen=True)
class Materials:
    """What tasks are built from: ``words`` for keys and word values, ``essay`` sentences of
    held-out real text, ``documents`` of held-out text for perplexity."""

    words: list[str]
    essay: list[str]
    documents: list[str]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A synthetic task: how to build one sample, and RULER's cap on generated tokens."""

    name: str
    build: str  # "niah", "vt" or "cwe"
    options: tuple = ()
    max_new_tokens: int = 128

    @property
    def has_depth(self) -> bool:
        return self.build == "niah"

    def sample(
        self,
        rng: np.random.Generator,
        tokenizer: Tokenizer,
        length: int,
        materials: Materials,
        *,
        depth: float | None = None,
        reserve: int = 0,
    ) -> TaskSample:
        options = dict(self.options)
        if self.build == "niah":
            return make_niah(
                rng, tokenizer, length, words=materials.words, essay=materials.essay,
                depth=depth, reserve=reserve, **options,
            )  # fmt: skip
        if self.build == "vt":
            return make_vt(rng, tokenizer, length, reserve=reserve, **options)
        return make_cwe(rng, tokenizer, length, words=materials.words, reserve=reserve)


def _niah(name: str, **options) -> TaskSpec:
    return TaskSpec(name, "niah", tuple(sorted(options.items())), 128)


RULER_TASKS = {
    t.name: t
    for t in (
        _niah("niah_single_1", haystack="noise", value_kind="numbers"),
        _niah("niah_single_2", haystack="essay", value_kind="numbers"),
        _niah("niah_single_3", haystack="essay", value_kind="uuids"),
        _niah("niah_multikey_1", haystack="essay", num_keys=4),
        _niah("niah_multikey_2", haystack="needle"),
        _niah("niah_multikey_3", haystack="needle", key_kind="uuids", value_kind="uuids"),
        _niah("niah_multivalue", haystack="essay", num_values=4),
        _niah("niah_multiquery", haystack="essay", num_keys=4, num_queries=4),
        TaskSpec("vt", "vt", (("hops", 4),), 30),
        TaskSpec("cwe", "cwe", (), 120),
    )
}
ALIASES = {"niah": "niah_single_1", "niah_multikey": "niah_multikey_1"}
TASK_NAMES = (*ALIASES, *RULER_TASKS, "ppl", "ruler")


@functools.cache
def task_spec(name: str) -> TaskSpec:
    """The spec of a synthetic task by name (aliases included)."""
    spec = RULER_TASKS.get(ALIASES.get(name, name))
    if spec is None:
        import difflib

        near = difflib.get_close_matches(name, TASK_NAMES, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"task {name!r} is unknown{hint}; tasks: {', '.join(TASK_NAMES)}")
    return spec
