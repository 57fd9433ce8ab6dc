"""The one attention interface the model uses; implementations plug in behind ``impl``."""

from __future__ import annotations

import jax

from pallas_kernels import reference

ATTENTION_IMPLS = ("xla",)


def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    window: int | None = None,
    impl: str = "xla",
) -> jax.Array:
    """q (b, t, hq, d), k/v (b, t, hkv, d) -> (b, t, hq, d); causal, optionally windowed.

    ``xla``: the pure-jnp reference of ``pallas_kernels`` (materialises the score matrix).
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl {impl!r} is unknown; use one of {ATTENTION_IMPLS}")
    return reference.causal_attention_reference(q, k, v, window=window, segment_ids=segment_ids)
