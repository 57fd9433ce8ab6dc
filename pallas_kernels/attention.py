"""Public ops: sliding-window attention and conditional (query-sparse) global attention.

Both match ``pallas_kernels.reference`` exactly in semantics and are differentiable in q, k, v
(custom VJP with Pallas backward kernels). Sequences of any length are padded to the tile size
internally; the padding is never visible to real tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.blocks import AttentionBlocks, check_head_dim, default_blocks
from pallas_kernels.flash import (
    FlashSpec,
    flash_attention,
    flash_backward,
    flash_forward,
    forward_output,
    query_tiles_per_key_tile,
    softmax_delta,
)
from pallas_kernels.reference import check_attention_shapes, check_rows_shapes


def _resolve_interpret(interpret: bool | None) -> bool:
    """``None``: run the kernels natively on a GPU, in interpret mode anywhere else."""
    if interpret is None:
        return jax.default_backend() != "gpu"
    return bool(interpret)


def _setup(q, k, v, segment_ids, route, sm_scale, interpret, blocks, window, *, routed=False):
    check_attention_shapes(q, k, v, segment_ids, route)
    return _spec(
        q, k, v, sm_scale, interpret, blocks, window, segment_ids is not None, routed=routed
    )


def _spec(q, k, v, sm_scale, interpret, blocks, window, has_segments, *, routed=False):
    """The kernels' ``FlashSpec`` and the sequence length (of the keys) padded to the tiles."""
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
    seq_len = k.shape[1]
    blocks_given = blocks  # tiles asked for are Triton's: those calls stay on Triton
    blocks = blocks or default_blocks(
        seq_len, q.shape[-1], interpret=interpret, itemsize=q.dtype.itemsize, routed=routed
    )
    spec = FlashSpec(
        window=window,
        sm_scale=q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale),
        blocks=blocks,
        has_segments=has_segments,
        interpret=interpret,
        hopper=not interpret and blocks_given is None,
    )
    padded = -(-seq_len // blocks.seq_multiple) * blocks.seq_multiple
    return spec, padded


def _pad(x, length):
    """Zero-pads axis 1 (the sequence) to ``length``."""
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, length - x.shape[1])
    return jnp.pad(x, widths)


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
    qtiles = _qtiles(qpos, padded, spec)
    out = flash_attention(
        _pad(q, padded), _pad(k, padded), _pad(v, padded), qpos, seg, seg, qtiles, spec
    )
    return out[:, :t]


def compact_routed(route: jax.Array, rows: int):
    """Routed tokens first, in their original order, in ``rows`` compacted rows (at least the
    routed count of every batch row).

    Returns ``qpos`` (B, rows): the original position of each compacted row, -1 for padding
    rows, and ``slot`` (B, T): each routed token's compacted row, -1 for skipped tokens. The
    two are inverse maps between routed tokens and the first rows of the compacted order.
    """
    b, t = route.shape
    slot = jnp.where(route, jnp.cumsum(route, axis=1, dtype=jnp.int32) - 1, -1)
    target = jnp.where(route, slot, rows)  # skipped tokens aim past the end and are dropped
    qpos = (
        jnp.full((b, rows), -1, jnp.int32)
        .at[jnp.arange(b)[:, None], target]
        .set(jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)), mode="drop")
    )
    return qpos, slot


def _take_rows(x, src, axis=1, fill=0):
    """Rows of x along ``axis`` picked by ``src`` (B, N); ``fill`` where ``src`` is -1."""
    shape = [1] * x.ndim
    shape[0], shape[axis] = src.shape
    src = src.reshape(shape)
    got = jnp.take_along_axis(x, jnp.maximum(src, 0), axis=axis)
    return jnp.where(src >= 0, got, jnp.asarray(fill, x.dtype))


def _qtiles(qpos, num_keys: int, spec: FlashSpec):
    cfg = spec.blocks.dkdv
    return query_tiles_per_key_tile(
        qpos, num_keys=num_keys, window=spec.window, block_q=cfg.block_q, block_k=cfg.block_k
    )


# Routed queries are compacted into a buffer as long as the (padded) sequence: the launch grid
# is static. Query tiles holding only padding return at once, and nothing reads what they leave
# in the kernels' outputs: every compacted input is gathered from token order, and every
# compacted output is read back only at routed tokens' rows.


def _global_forward(q, k, v, qpos, slot, qseg, seg, spec: FlashSpec):
    """Output (B, T, Hq, D) and log2-sum-exp (B, Hq, T) (+inf for skipped tokens), and the
    compacted queries, which the backward reads again."""
    q_compact = _take_rows(q, qpos)
    o, lse = flash_forward(q_compact, k, v, qpos, qseg, seg, spec)
    return _take_rows(o, slot), _take_rows(lse, slot, axis=2, fill=jnp.inf), q_compact


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _global_attention(q, k, v, qpos, slot, qseg, seg, spec):
    o = forward_output(_take_rows(q, qpos), k, v, qpos, qseg, seg, spec)
    return _take_rows(o, slot)


def _global_attention_fwd(q, k, v, qpos, slot, qseg, seg, spec):
    o, lse, q_compact = _global_forward(q, k, v, qpos, slot, qseg, seg, spec)
    return o, (q_compact, k, v, qpos, slot, qseg, seg, o, lse)


def _global_attention_bwd(spec, residuals, do):
    q_compact, k, v, qpos, slot, qseg, seg, o, lse = residuals
    # delta in token order and then gathered: O itself never needs compacting
    delta = softmax_delta(o, do)
    dq, dk, dv = flash_backward(
        q_compact,
        k,
        v,
        _take_rows(delta, qpos, axis=2),
        _take_rows(lse, qpos, axis=2, fill=jnp.inf),
        _take_rows(do, qpos),
        qpos,
        qseg,
        seg,
        _qtiles(qpos, k.shape[1], spec),
        spec,
    )
    return _take_rows(dq, slot), dk, dv, None, None, None, None


_global_attention.defvjp(_global_attention_fwd, _global_attention_bwd)


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
    (stable order, original positions kept), so the work is proportional to the routed count.
    """
    spec, padded = _setup(
        q, k, v, segment_ids, route, sm_scale, interpret, blocks, None, routed=True
    )
    seg = _segments(segment_ids, q.shape[0], padded)
    qpos, slot = compact_routed(route.astype(bool), padded)
    qseg = _take_rows(seg, qpos)
    k, v = _pad(k, padded), _pad(v, padded)
    return _global_attention(q, k, v, qpos, slot, qseg, seg, spec)


def routed_rows_attention(
    q_rows: jax.Array,
    k: jax.Array,
    v: jax.Array,
    qpos: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
    interpret: bool | None = None,
    blocks: AttentionBlocks | None = None,
) -> jax.Array:
    """Full causal attention for routed queries handed over as rows, as
    ``compact_routed`` lays them out: q_rows (B, N, Hq, D) at positions ``qpos`` (B, N),
    ascending, padding rows (-1) last; k, v (B, T, Hkv, D); segment_ids (B, T). Key j is
    visible to row n iff j <= qpos[b, n] (and both share a segment); padding rows give
    exactly zero. The kernels and cost are those of ``conditional_global_attention``, without
    its gather of the queries and scatter of the outputs, so a caller that projects only the
    routed tokens' queries never builds full-length query or output arrays."""
    check_rows_shapes(q_rows, k, v, qpos, segment_ids)
    spec, padded = _spec(
        q_rows, k, v, sm_scale, interpret, blocks, None, segment_ids is not None, routed=True
    )
    b, n = qpos.shape
    rows = -(-n // spec.blocks.seq_multiple) * spec.blocks.seq_multiple
    qpos = jnp.pad(qpos.astype(jnp.int32), ((0, 0), (0, rows - n)), constant_values=-1)
    seg = _segments(segment_ids, b, padded)
    # Tiles holding only padding rows return at once, leaving whatever was in their output
    # (and dQ) rows: selecting zeros there, on the way in and out, keeps it from the result
    # and from the gradient of q_rows.
    valid = (qpos >= 0)[:, :, None, None]
    q = jnp.where(valid, _pad(q_rows, rows), jnp.zeros((), q_rows.dtype))
    qtiles = _qtiles(qpos, padded, spec)  # read by the backward only
    out = flash_attention(
        q, _pad(k, padded), _pad(v, padded), qpos, _take_rows(seg, qpos), seg, qtiles, spec
    )
    return jnp.where(valid, out, jnp.zeros((), out.dtype))[:, :n]
