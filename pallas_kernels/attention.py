"""Public ops: sliding-window attention and conditional (query-sparse) global attention.

Both match ``pallas_kernels.reference`` exactly in semantics and are differentiable in q, k, v
(custom VJP with Pallas backward kernels). Sequences of any length are padded to the tile size
internally; the padding is never visible to real tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.blocks import AttentionBlocks, check_head_dim, default_blocks
from pallas_kernels.flash import FlashSpec, flash_attention
from pallas_kernels.reference import check_attention_shapes

_BIG = jnp.iinfo(jnp.int32).max


def _resolve_interpret(interpret: bool | None) -> bool:
    """``None``: run the kernels natively on a GPU, in interpret mode anywhere else."""
    if interpret is None:
        return jax.default_backend() != "gpu"
    return bool(interpret)


def _setup(q, k, v, segment_ids, route, sm_scale, interpret, blocks, window):
    check_attention_shapes(q, k, v, segment_ids, route)
    check_head_dim(q.shape[-1])
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
            raise ValueError(f"{name} must be float32, bfloat16 or float16; got {x.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(
            f"window must be an int >= 1 (keys per query, itself included); got {window!r}"
        )
    interpret = _resolve_interpret(interpret)
    seq_len = q.shape[1]
    blocks = blocks or default_blocks(seq_len, q.shape[-1], interpret=interpret)
    spec = FlashSpec(
        window=window,
        sm_scale=q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale),
        blocks=blocks,
        has_segments=segment_ids is not None,
        interpret=interpret,
    )
    padded = -(-seq_len // blocks.seq_multiple) * blocks.seq_multiple
    return spec, padded


def _pad(x, length, value=0):
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, length - x.shape[1])
    return jnp.pad(x, widths, constant_values=value)


def _segments(segment_ids, batch, padded):
    if segment_ids is None:
        return jnp.zeros((batch, padded), jnp.int32)
    return _pad(segment_ids.astype(jnp.int32), padded)


def sliding_window_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    window: int,
    segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
    interpret: bool | None = None,
    blocks: AttentionBlocks | None = None,
) -> jax.Array:
    """Causal attention over the ``window`` most recent keys (itself included).

    q (B, T, Hq, D); k, v (B, T, Hkv, D); segment_ids (B, T) int. Key j is visible to query i
    iff i - window < j <= i (and, with segments, both share a segment id).
    """
    spec, padded = _setup(q, k, v, segment_ids, None, sm_scale, interpret, blocks, window)
    b, t = q.shape[:2]
    qpos = jnp.broadcast_to(jnp.arange(padded, dtype=jnp.int32), (b, padded))
    seg = _segments(segment_ids, b, padded)
    cfg = spec.blocks.dkdv
    k0 = jnp.arange(padded // cfg.block_k, dtype=jnp.int32) * cfg.block_k
    qstart = k0 // cfg.block_q
    qend = jnp.minimum(padded // cfg.block_q, -(-(k0 + cfg.block_k + window - 1) // cfg.block_q))
    qstart = jnp.broadcast_to(qstart, (b, qstart.shape[0]))
    qend = jnp.broadcast_to(qend, (b, qend.shape[0]))
    out = flash_attention(
        _pad(q, padded), _pad(k, padded), _pad(v, padded), qpos, seg, seg, qstart, qend, spec
    )
    return out[:, :t]


def compact_routed(route: jax.Array, padded: int):
    """Routed tokens first, in their original order.

    Returns ``order`` (B, padded): the original index of each compacted row (0 for padding),
    ``qpos`` (B, padded): the same with -1 for padding rows, ``slot`` (B, T): each token's
    compacted row, and ``count`` (B,): the number of routed tokens.
    """
    b, t = route.shape
    slot = jnp.cumsum(route, axis=1, dtype=jnp.int32) - 1
    count = slot[:, -1] + 1
    rows = jnp.where(route, slot, padded)  # skipped tokens aim past the end and are dropped
    order = (
        jnp.zeros((b, padded), jnp.int32)
        .at[jnp.arange(b)[:, None], rows]
        .set(jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)), mode="drop")
    )
    qpos = jnp.where(jnp.arange(padded)[None, :] < count[:, None], order, -1)
    return order, qpos, slot, count


def _query_tiles_per_key_tile(qpos, count, cfg, padded):
    """For each key tile, the compacted query tiles [qstart, qend) whose rows can see it: those
    whose largest position reaches the tile (positions ascend, so a suffix of the routed ones)."""
    b = qpos.shape[0]
    tile_max = qpos.reshape(b, -1, cfg.block_q).max(axis=-1)
    tile_max = jnp.where(tile_max < 0, _BIG, tile_max)
    k0 = jnp.arange(padded // cfg.block_k, dtype=jnp.int32) * cfg.block_k
    qstart = jax.vmap(lambda m: jnp.searchsorted(m, k0, side="left"))(tile_max).astype(jnp.int32)
    qend = (count + cfg.block_q - 1) // cfg.block_q
    qend = jnp.broadcast_to(qend[:, None], qstart.shape).astype(jnp.int32)
    return jnp.minimum(qstart, qend), qend


def conditional_global_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    route: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
    interpret: bool | None = None,
    blocks: AttentionBlocks | None = None,
) -> jax.Array:
    """Full causal attention for tokens with ``route`` true; exactly zero for the others.

    q (B, T, Hq, D); k, v (B, T, Hkv, D); route (B, T) bool. Routed queries are compacted
    (stable order, original positions kept) so the work is proportional to the routed count.
    """
    spec, padded = _setup(q, k, v, segment_ids, route, sm_scale, interpret, blocks, None)
    b, t = q.shape[:2]
    route = route.astype(bool)
    order, qpos, slot, count = compact_routed(route, padded)
    seg = _segments(segment_ids, b, padded)
    rows = order[:, :, None, None]
    is_row = (qpos >= 0)[:, :, None, None]
    q_compact = jnp.where(is_row, jnp.take_along_axis(q, jnp.minimum(rows, t - 1), axis=1), 0)
    qseg = jnp.take_along_axis(seg, order, axis=1)
    qstart, qend = _query_tiles_per_key_tile(qpos, count, spec.blocks.dkdv, padded)
    out = flash_attention(
        q_compact, _pad(k, padded), _pad(v, padded), qpos, qseg, seg, qstart, qend, spec
    )
    gathered = jnp.take_along_axis(out, jnp.maximum(slot, 0)[:, :, None, None], axis=1)
    return jnp.where(route[:, :, None, None], gathered, jnp.zeros((), out.dtype))
