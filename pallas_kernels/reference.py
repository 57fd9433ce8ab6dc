"""Pure-jnp attention that defines the semantics every kernel in this package must match.

Shapes: q (B, T, Hq, D); k, v (B, T, Hkv, D) with Hq % Hkv == 0; query head h reads kv head
h // (Hq // Hkv). Softmax statistics are float32; the output has q's dtype.

Visibility of key j to query i (row i, column j), e.g. T=4, window=2, no segments::

    sliding (window=2)      causal (window=None)
    1 . . .                 1 . . .
    1 1 . .                 1 1 . .
    . 1 1 .                 1 1 1 .
    . . 1 1                 1 1 1 1

With ``segment_ids`` a key is visible only inside the query's own segment (packed documents).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_attention_shapes(q, k, v, segment_ids=None, route=None) -> None:
    """Raises a ValueError naming the offending argument when shapes do not fit the contract."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"q, k, v must be (batch, seq, heads, head_dim); got {q.shape}, {k.shape}, {v.shape}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {k.shape} and {v.shape}")
    b, t, hq, d = q.shape
    if k.shape[0] != b or k.shape[1] != t or k.shape[3] != d:
        raise ValueError(f"k/v {k.shape} do not match q {q.shape} in batch, seq or head_dim")
    if hq % k.shape[2]:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({k.shape[2]})")
    for name, arr in (("segment_ids", segment_ids), ("route", route)):
        if arr is not None and arr.shape != (b, t):
            raise ValueError(f"{name} must have shape (batch, seq) = {(b, t)}; got {arr.shape}")


def check_rows_shapes(q_rows, k, v, qpos, segment_ids=None) -> None:
    """``check_attention_shapes`` for queries given as rows: q_rows (B, N, Hq, D) at
    positions qpos (B, N) against k, v (B, T, Hkv, D)."""
    if q_rows.ndim != 4 or qpos.shape != q_rows.shape[:2]:
        raise ValueError(
            f"q_rows must be (batch, rows, heads, head_dim) and qpos (batch, rows); got "
            f"{q_rows.shape} and {qpos.shape}"
        )
    check_attention_shapes(k, k, v, segment_ids)
    if q_rows.shape[0] != k.shape[0] or q_rows.shape[3] != k.shape[3]:
        raise ValueError(f"q_rows {q_rows.shape} do not match k/v {k.shape} in batch or head_dim")
    if q_rows.shape[2] % k.shape[2]:
        raise ValueError(
            f"query heads ({q_rows.shape[2]}) must be a multiple of kv heads ({k.shape[2]})"
        )


def visibility_mask(
    seq_len: int, *, window: int | None = None, segment_ids: jax.Array | None = None
) -> jax.Array:
    """Boolean (B or 1, T, T) mask: True where query i may read key j."""
    i = jnp.arange(seq_len)[:, None]
    j = jnp.arange(seq_len)[None, :]
    mask = j <= i
    if window is not None:
        mask &= i - window < j
    mask = mask[None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask


def masked_attention(q, k, v, mask, *, sm_scale: float | None = None) -> jax.Array:
    """Softmax attention under an explicit (B or 1, T, T) mask; rows with no visible key give 0."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    scale = d**-0.5 if sm_scale is None else sm_scale
    qg = q.reshape(b, t, hkv, group, d)
    logits = (
        jnp.einsum(
            "bikgd,bjkd->bkgij",
            qg,
            k,
            preferred_element_type=jnp.float32,
            precision=jax.lax.Precision.HIGHEST,
        )
        * scale
    )
    mask = mask[:, None, None]
    logits = jnp.where(mask, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.exp(logits - row_max)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum(
        "bkgij,bjkd->bikgd", p, v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    return out.reshape(b, t, hq, d).astype(q.dtype)


def causal_attention_reference(
    q, k, v, *, window: int | None = None, segment_ids=None, sm_scale: float | None = None
) -> jax.Array:
    """Causal attention; with ``window``, key j is visible to query i iff i - window < j <= i."""
    check_attention_shapes(q, k, v, segment_ids)
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 (keys per query, itself included); got {window}")
    mask = visibility_mask(q.shape[1], window=window, segment_ids=segment_ids)
    return masked_attention(q, k, v, mask, sm_scale=sm_scale)


def sliding_window_attention_reference(
    q, k, v, *, window: int, segment_ids=None, sm_scale: float | None = None
) -> jax.Array:
    """Each query reads the ``window`` most recent keys of its segment, itself included."""
    return causal_attention_reference(
        q, k, v, window=window, segment_ids=segment_ids, sm_scale=sm_scale
    )


def conditional_global_attention_reference(
    q, k, v, route, *, segment_ids=None, sm_scale: float | None = None
) -> jax.Array:
    """Full causal attention for queries with ``route`` true; exactly zero for the others."""
    check_attention_shapes(q, k, v, segment_ids, route)
    out = causal_attention_reference(q, k, v, segment_ids=segment_ids, sm_scale=sm_scale)
    return jnp.where(route[:, :, None, None], out, jnp.zeros((), out.dtype))


def routed_rows_attention_reference(
    q_rows, k, v, qpos, *, segment_ids=None, sm_scale: float | None = None
) -> jax.Array:
    """Full causal attention for queries given as rows: q_rows (B, N, Hq, D) sit at positions
    ``qpos`` (B, N) of a sequence whose keys and values are k, v (B, T, Hkv, D); key j is
    visible to row n iff j <= qpos[b, n] (and, with ``segment_ids`` (B, T), both share a
    segment). A row at position -1 (padding) sees nothing and gives exactly zero."""
    check_rows_shapes(q_rows, k, v, qpos, segment_ids)
    keys = jnp.arange(k.shape[1])[None, None, :]
    mask = (keys <= qpos[:, :, None]) & (qpos[:, :, None] >= 0)
    if segment_ids is not None:
        own = jnp.take_along_axis(segment_ids, jnp.maximum(qpos, 0), axis=1)
        mask &= own[:, :, None] == segment_ids[:, None, :]
    return masked_attention(q_rows, k, v, mask, sm_scale=sm_scale)


def decode_attention_reference(q, k, v, num_keys, route=None, *, sm_scale: float | None = None):
    """One new query per row against a KV cache: q (B, 1, Hq, D) reads the first
    ``num_keys[b]`` (B,) slots of k, v (B, S, Hkv, D); with ``route`` (B,) bool, rows not routed
    give exactly zero."""
    visible = jnp.arange(k.shape[1])[None, None, :] < num_keys[:, None, None]
    out = masked_attention(q, k, v, visible, sm_scale=sm_scale)
    if route is None:
        return out
    return jnp.where(route[:, None, None, None], out, jnp.zeros((), out.dtype))
