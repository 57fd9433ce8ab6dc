"""Choosing which global branches to prune after training, from how often each layer routes.

A layer whose router almost never fires adds little but costs a global KV cache of every
token. ``measure_routing`` reads each L2A layer's routed fraction (and the perplexity) over
held-out text; ``choose_layers`` picks the layers to prune, by a threshold on that fraction or
until the cache fits a budget; ``convert.prune_global_branches`` removes them.
"""

from __future__ import annotations

import math

import numpy as np

from l2a_jax.config import ConfigError
from l2a_jax.data.corpus import token_windows
from l2a_jax.data.tokenizers import Tokenizer
from l2a_jax.evals.scoring import token_nll
from l2a_jax.generate import GLOBAL, cache_layout, cache_size
from l2a_jax.model import QwenModel


def measure_routing(
    model: QwenModel,
    tokenizer: Tokenizer,
    documents: list[str],
    *,
    length: int,
    samples: int = 8,
    batch_size: int = 4,
) -> tuple[dict[int, float], float]:
    """Per L2A layer, the fraction of tokens routed to global attention over ``samples``
    windows of ``length`` tokens of ``documents`` (evenly spaced through them), and the
    perplexity over the same windows."""
    if model.l2a is None:
        raise ConfigError("the model has no L2A layers to measure")
    windows = np.asarray(token_windows(tokenizer, documents, length, samples), np.int32)
    routed_sum, nll_sum, count = 0.0, 0.0, 0
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]
        nll, routed = token_nll(model, batch)
        routed_sum = routed_sum + routed * batch.size
        nll_sum += float(nll.sum())
        count += nll.size
    fractions = routed_sum / (len(windows) * length)
    return dict(zip(model.l2a_layers, map(float, fractions), strict=True)), math.exp(
        nll_sum / count
    )


def choose_layers(
    model: QwenModel,
    routed: dict[int, float],
    *,
    threshold: float | None = None,
    kv_fraction: float | None = None,
    kv_bytes_per_token: int | None = None,
) -> tuple[int, ...]:
    """L2A layers to prune: those routing less than ``threshold``, or the least-routing ones
    until the global caches take at most ``kv_fraction`` of the unpruned bytes per token of
    context or ``kv_bytes_per_token`` (exactly one criterion). Only layers that hold a global
    cache are candidates: already pruned layers and ``swa`` layers have none."""
    if sum(x is not None for x in (threshold, kv_fraction, kv_bytes_per_token)) != 1:
        raise ConfigError("give exactly one of: a threshold, a KV fraction, a KV bytes budget")
    cached = [i for i, slots in enumerate(cache_layout(model, 1)) if GLOBAL in slots]
    # pruned and swa layers hold no global cache: nothing to prune, no bytes to save
    candidates = [i for i in routed if i in cached]
    if threshold is not None:
        return tuple(sorted(i for i in candidates if routed[i] < threshold))
    before = cache_size(model, 1).per_token
    per_layer = before // max(len(cached), 1)  # every global cache costs the same per token
    budget = kv_bytes_per_token if kv_bytes_per_token is not None else kv_fraction * before
    if not budget >= 0:
        raise ConfigError(f"the KV budget must be >= 0 bytes per token; got {budget}")
    chosen, left = [], before
    for i in sorted(candidates, key=lambda i: (routed[i], i)):
        if left <= budget:
            break
        chosen.append(i)
        left -= per_layer
    if left > budget:
        raise ConfigError(
            f"pruning every L2A layer leaves {left} bytes per token (base layers keep their "
            f"caches), above the budget of {budget:.0f}"
        )
    return tuple(sorted(chosen))
