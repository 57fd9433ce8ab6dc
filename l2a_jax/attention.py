"""The one attention interface the model uses; implementations plug in behind ``impl``.

- ``xla``: the pure-jnp references of ``pallas_kernels`` (materialise the score matrix);
- ``pallas``: the Pallas kernels (native on a GPU, interpret mode elsewhere);
- ``auto``: ``pallas`` on a GPU for head dims the kernels support, ``xla`` otherwise.
"""

from __future__ import annotations

import jax

import pallas_kernels
from pallas_kernels import reference
from pallas_kernels.blocks import SUPPORTED_HEAD_DIMS

ATTENTION_IMPLS = ("auto", "xla", "pallas")


def resolve_impl(impl: str, head_dim: int) -> str:
    """The implementation that ``impl`` runs as on this machine for heads of ``head_dim``."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl {impl!r} is unknown; use one of {ATTENTION_IMPLS}")
    if impl == "auto":
        native = jax.default_backend() == "gpu" and head_dim in SUPPORTED_HEAD_DIMS
        return "pallas" if native else "xla"
    return impl


def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    window: int | None = None,
    impl: str = "xla",
) -> jax.Array:
    """q (b, t, hq, d), k/v (b, t, hkv, d) -> (b, t, hq, d); causal, optionally windowed."""
    if resolve_impl(impl, q.shape[-1]) == "pallas":
        # a window as long as the sequence is plain causal attention
        return pallas_kernels.sliding_window_attention(
            q, k, v, window=window or q.shape[1], segment_ids=segment_ids
        )
    return reference.causal_attention_reference(q, k, v, window=window, segment_ids=segment_ids)


def global_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    route: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    impl: str = "xla",
) -> jax.Array:
    """Causal attention for queries with ``route`` (b, t) true, exactly zero for the others."""
    if resolve_impl(impl, q.shape[-1]) == "pallas":
        return pallas_kernels.conditional_global_attention(q, k, v, route, segment_ids=segment_ids)
    return reference.conditional_global_attention_reference(q, k, v, route, segment_ids=segment_ids)
