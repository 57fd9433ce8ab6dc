"""Scoring a model on task samples, and perplexity.

- ``generate`` scoring (RULER's): greedy generation with the KV cache; a sample scores the
  fraction of its expected strings found in the output (case-insensitive substrings).
- ``likelihood`` scoring (for small models that follow no instructions): the log-probability
  of the right continuation against the sample's distractors (wrong answers of the same form,
  values present elsewhere in the text first); a sample scores 1 when the right one is the
  most likely, else 0.

Both also report the routed fraction of every L2A layer over the prompts' real tokens
(token-weighted), what a direct forward over the same prompts gives.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from l2a_jax.data.needles import TaskSample
from l2a_jax.data.tokenizers import Tokenizer
from l2a_jax.generate import generate
from l2a_jax.model import QwenModel
from l2a_jax.routing import Routing

SCORINGS = ("generate", "likelihood")
# tokens generated beyond the right answer's own; prompts for generation leave them free
GENERATION_SLACK = 16


def found_fraction(text: str, expected) -> float:
    """RULER's per-sample score: the fraction of ``expected`` strings in ``text``."""
    text = text.lower()
    return sum(e.lower() in text for e in expected) / len(expected)


def _bucket(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def generation_budget(tokenizer: Tokenizer, samples: list[TaskSample], cap: int) -> int:
    """Tokens to generate for a batch: the longest right answer plus some slack, rounded up to
    16 (one compiled program serves many batches), at most the task's cap."""
    longest = max(len(tokenizer.encode(s.answer)) for s in samples)
    return min(cap, _bucket(longest + GENERATION_SLACK, 16))


def score_generate(
    model: QwenModel,
    tokenizer: Tokenizer,
    samples: list[TaskSample],
    prompts: list[list[int]],
    *,
    width: int,
    budget: int,
):
    """Per-sample scores, per-layer routed fractions (token-weighted over the batch's
    prompts, or None) and the number of prompt tokens they cover. ``prompts``: the samples'
    prompts as token ids, right-padded to ``width`` so batches of one length share a compiled
    program."""
    lengths = [len(p) for p in prompts]
    ids = np.zeros((len(samples), max(width, *lengths)), np.int32)
    for row, p in enumerate(prompts):
        ids[row, : len(p)] = p
    new, stats = generate(
        model,
        ids,
        prompt_lengths=lengths,
        max_new_tokens=budget,
        eos_token_id=tokenizer.eos_id,
        return_stats=True,
    )
    scores, outputs = [], []
    for sample, row in zip(samples, np.asarray(new).tolist(), strict=True):
        if tokenizer.eos_id in row:
            row = row[: row.index(tokenizer.eos_id)]
        text = tokenizer.decode(row)
        outputs.append(text)
        scores.append(found_fraction(text, sample.expected))
    routed = None if stats is None else np.asarray(stats.routed_fraction, np.float64)
    return scores, outputs, routed, sum(lengths)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _candidate_logprobs(graphdef, state, ids, counted, positions, targets, weights):
    """Sum of log p(target) at ``positions`` per row, and the routing statistics."""
    model = nnx.merge(graphdef, state)
    # a fixed key for layers that route at random (baselines); learned routers ignore it
    routing = Routing(rng=jax.random.key(0), counted=counted)
    hidden, stats = model.hidden_with_stats(ids, routing=routing)
    picked = jnp.take_along_axis(hidden, positions[:, :, None], axis=1)
    logits = jnp.einsum(
        "bcd,dv->bcv", picked, model.output_head(), preferred_element_type=jnp.float32
    )
    logp = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logp, targets[:, :, None], axis=2)[:, :, 0]
    return jnp.sum(chosen * weights, axis=1), stats


def score_likelihood(
    model: QwenModel, tokenizer: Tokenizer, samples: list[TaskSample], prompts: list[list[int]]
):
    """Per-sample scores (1 when the right answer is more likely than every distractor),
    per-layer routed fractions over the prompts (or None) and the prompt tokens counted.
    ``prompts``: the samples' prompts as token ids."""
    rows, owners = [], []
    for i, (sample, prompt) in enumerate(zip(samples, prompts, strict=True)):
        for answer in (sample.answer, *sample.distractors):
            rows.append((prompt, tokenizer.encode(answer)))
            owners.append(i)
    width = _bucket(max(len(p) + len(a) for p, a in rows))
    most = max(len(a) for _, a in rows)
    ids = np.zeros((len(rows), width), np.int32)
    counted = np.zeros((len(rows), width), bool)
    positions = np.zeros((len(rows), most), np.int32)
    targets = np.zeros((len(rows), most), np.int32)
    weights = np.zeros((len(rows), most), np.float32)
    for r, (prompt, answer) in enumerate(rows):
        ids[r, : len(prompt) + len(answer)] = prompt + answer
        counted[r, : len(prompt)] = True
        n = len(answer)
        positions[r, :n] = np.arange(len(prompt) - 1, len(prompt) + n - 1)
        targets[r, :n] = answer
        weights[r, :n] = 1.0
    graphdef, state = nnx.split(model)
    logp, stats = _candidate_logprobs(graphdef, state, ids, counted, positions, targets, weights)
    logp = np.asarray(logp)
    scores = []
    for i in range(len(samples)):
        mine = logp[[r for r, o in enumerate(owners) if o == i]]
        scores.append(float(mine[0] > mine[1:].max()) if len(mine) > 1 else 1.0)
    tokens = int(counted.sum())
    routed = None if stats is None else np.asarray(stats.routed_fraction, np.float64)
    return scores, routed, tokens


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"))
def _token_nll(graphdef, state, ids, *, chunk: int):
    """Negative log-likelihood (b, t - 1) of each next token, logits ``chunk`` positions at a
    time (never the whole (b, t, vocab) float32 array), and the routing statistics."""
    model = nnx.merge(graphdef, state)
    hidden, stats = model.hidden_with_stats(ids, routing=Routing(rng=jax.random.key(0)))
    b, t, d = hidden.shape
    n = t - 1
    chunks = -(-n // chunk)
    pad = chunks * chunk - n
    h = jnp.pad(hidden[:, :-1], [(0, 0), (0, pad), (0, 0)]).reshape(b, chunks, chunk, d)
    y = jnp.pad(ids[:, 1:], [(0, 0), (0, pad)]).reshape(b, chunks, chunk)

    def one(xs):
        h, y = xs
        logits = jnp.einsum(
            "bcd,dv->bcv", h, model.output_head(), preferred_element_type=jnp.float32
        )
        return (
            jax.nn.logsumexp(logits, axis=-1)
            - jnp.take_along_axis(logits, y[..., None], -1)[..., 0]
        )

    nll = jax.lax.map(one, (jnp.moveaxis(h, 1, 0), jnp.moveaxis(y, 1, 0)))
    return jnp.moveaxis(nll, 0, 1).reshape(b, chunks * chunk)[:, :n], stats


def token_nll(model: QwenModel, ids: np.ndarray, chunk: int = 4096):
    """Per-token NLL (b, t - 1) float32 of ``ids`` (b, t), and per-layer routed fractions."""
    graphdef, state = nnx.split(model)
    nll, stats = _token_nll(graphdef, state, jnp.asarray(ids, jnp.int32), chunk=chunk)
    routed = None if stats is None else np.asarray(stats.routed_fraction, np.float64)
    return np.asarray(nll), routed
