"""Pallas (Triton lowering) flash-attention kernels over explicit query positions.

One forward kernel, one dQ kernel and one dK/dV kernel serve both public ops:

- every query row carries its original position ``qpos`` (-1 for a padding row), so the same
  kernels run on a natural sequence (sliding window: ``qpos = arange``) and on a compacted set
  of routed queries (conditional global: ``qpos`` = the routed tokens' positions, ascending);
- key j is visible to a query at position i iff ``j <= i`` and, with a window W, ``i - W < j``,
  and, with segments, the two share a segment id;
- a query tile visits only key tiles in [lo, hi) derived from its smallest and largest
  position, split into tiles that need the mask (edges) and tiles that do not;
- the dK/dV kernel visits, per key tile, only the query tiles that can see it (computed in
  XLA by ``query_tiles_per_key_tile``, again split into edge and interior tiles), and
  accumulates all query heads of its GQA group in registers (no atomics).

Softmax runs in base 2: scores are scaled by ``sm_scale * log2(e)`` and the saved
log-sum-exp is in log2 units; a row that saw no key stores +inf so its probabilities are 0.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.blocks import AttentionBlocks, BlockConfig

LOG2E = math.log2(math.e)
_FAR = 1 << 30  # a position beyond any sequence; keeps "no valid row" arithmetic overflow-free
_M_INIT = -1e30  # finite running-max start, so fully masked tiles never produce inf - inf


@dataclasses.dataclass(frozen=True)
class FlashSpec:
    """Static description of one attention problem (hashable: it keys compilation)."""

    window: int | None
    sm_scale: float
    blocks: AttentionBlocks
    has_segments: bool
    interpret: bool
    # passes that take no gradient may run the forward as the Mosaic GPU kernel of
    # ``hopper.py`` where it takes the problem (``hopper.takes``)
    hopper: bool = False


def _params(cfg: BlockConfig) -> plgpu.CompilerParams:
    return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _dot(a, b, *, trans_b=False):
    # float32 operands keep full precision; bf16 runs on the tensor cores with f32 accumulation
    exact = a.dtype == jnp.float32 and b.dtype == jnp.float32
    return plgpu.dot(a, b, trans_b=trans_b, allow_tf32=False if exact else None)


def _visible(qpos, kpos, qseg, kseg, *, window, causal_edge: bool, has_segments: bool):
    """Mask of keys visible to queries, or None when every key is visible. The four position
    and segment arrays are 2-D and broadcast against each other, so the same code builds a
    (queries, keys) mask and a transposed (keys, queries) one."""
    mask = None
    if causal_edge:
        mask = kpos <= qpos
        if window is not None:
            mask &= kpos > qpos - window
    if has_segments:
        same = qseg == kseg
        mask = same if mask is None else mask & same
    return mask


def _exp2(x, spec: FlashSpec):
    """2**x in float32. On the GPU one ``ex2.approx.ftz`` instruction (the libdevice call also
    handles subnormal results, which a softmax flushes to zero anyway); the interpreter uses
    jnp.exp2."""
    if spec.interpret:
        return jnp.exp2(x)
    [y] = plgpu.elementwise_inline_asm(
        "ex2.approx.ftz.f32 $0, $1;",
        args=[x],
        constraints="=f,f",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)],
    )
    return y


def _key_tile_ranges(qpos, *, window, block_k):
    """Key tiles for a query tile: masked [lo, f0), unmasked [f0, f1), masked [f1, hi)."""
    valid = qpos >= 0
    maxpos = jnp.max(qpos)
    minpos = jnp.min(jnp.where(valid, qpos, _FAR))
    hi = (maxpos + block_k) // block_k  # ceil((maxpos + 1) / block_k); 0 for an empty tile
    if window is None:
        lo = jnp.int32(0)
        f0 = jnp.int32(0)
    else:
        lo = jnp.maximum(minpos - window + 1, 0) // block_k
        first_full = (jnp.maximum(maxpos - window + 1, 0) + block_k - 1) // block_k
        f0 = jnp.maximum(first_full, lo)
    f1 = jnp.maximum(jnp.minimum((minpos + 1) // block_k, hi), f0)
    f0 = jnp.minimum(f0, hi)
    return lo, f0, f1, hi


def _key_tile(kb, bk, q, qpos, qseg, k_ref, v_ref, kseg_ref, spec: FlashSpec, causal_edge):
    """Key tile ``kb`` of a query tile: its keys and values, the unscaled scores (queries,
    keys), and the visibility mask (None for an interior tile without segments)."""
    k0 = pl.multiple_of(kb * bk, bk)
    k = k_ref[pl.ds(k0, bk), :]
    v = v_ref[pl.ds(k0, bk), :]
    kseg = kseg_ref[pl.ds(k0, bk)][None, :] if spec.has_segments else None
    mask = _visible(
        qpos[:, None],
        (k0 + jnp.arange(bk, dtype=jnp.int32))[None, :],
        qseg,
        kseg,
        window=spec.window,
        causal_edge=causal_edge,
        has_segments=spec.has_segments,
    )
    return k, v, _dot(q, k, trans_b=True), mask


def _over_tiles(ranges, tile, carry):
    """Runs ``tile(i, carry, causal_edge=...)`` over tiles [lo, f0) masked, [f0, f1) unmasked,
    [f1, hi) masked: the key tiles of a query tile (``_key_tile_ranges``) or the query tiles
    of a key tile (``query_tiles_per_key_tile``)."""
    lo, f0, f1, hi = ranges
    carry = jax.lax.fori_loop(lo, f0, functools.partial(tile, causal_edge=True), carry)
    carry = jax.lax.fori_loop(f0, f1, functools.partial(tile, causal_edge=False), carry)
    return jax.lax.fori_loop(f1, hi, functools.partial(tile, causal_edge=True), carry)


def _skip_padding_tiles(body, qpos_ref, *refs, spec: FlashSpec, block_k: int):
    """Runs ``body`` unless the query tile holds only padding rows (qpos -1, the end of a
    compacted buffer of routed queries): such a tile sees no key, and its outputs are never
    read, so it returns at once."""
    qpos = qpos_ref[...]
    ranges = _key_tile_ranges(qpos, window=spec.window, block_k=block_k)
    pl.when(ranges[-1] > 0)(lambda: body(qpos, ranges, *refs, spec=spec))


def _forward_kernel(*refs, spec: FlashSpec):
    _skip_padding_tiles(_forward_body, *refs, spec=spec, block_k=spec.blocks.forward.block_k)


def _forward_body(
    qpos, ranges, qseg_ref, kseg_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, spec: FlashSpec
):
    bk = spec.blocks.forward.block_k
    qseg = qseg_ref[...][:, None] if spec.has_segments else None
    q = q_ref[...]
    score_scale = spec.sm_scale * LOG2E

    def tile(kb, carry, *, causal_edge):
        acc, m, denom = carry
        # s is unscaled: the scale is folded into exp2's argument
        _, v, s, mask = _key_tile(kb, bk, q, qpos, qseg, k_ref, v_ref, kseg_ref, spec, causal_edge)
        if mask is not None:
            s = jnp.where(mask, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1) * score_scale)  # the scale is positive
        alpha = _exp2(m - m_new, spec)
        p = _exp2(s * score_scale - m_new[:, None], spec)
        denom = denom * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, denom

    bq, d = q.shape
    carry = (
        jnp.zeros((bq, d), jnp.float32),
        jnp.full((bq,), _M_INIT, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    acc, m, denom = _over_tiles(ranges, tile, carry)
    seen = denom > 0
    o_ref[...] = (acc / jnp.where(seen, denom, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log2(jnp.where(seen, denom, 1.0)), jnp.inf)


def _dq_kernel(*refs, spec: FlashSpec):
    _skip_padding_tiles(_dq_body, *refs, spec=spec, block_k=spec.blocks.dq.block_k)


def _dq_body(
    qpos,
    ranges,
    qseg_ref,
    kseg_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dq_ref,
    *,
    spec: FlashSpec,
):
    bk = spec.blocks.dq.block_k
    qseg = qseg_ref[...][:, None] if spec.has_segments else None
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    score_scale = spec.sm_scale * LOG2E

    def tile(kb, dq, *, causal_edge):
        k, v, s, mask = _key_tile(kb, bk, q, qpos, qseg, k_ref, v_ref, kseg_ref, spec, causal_edge)
        p = _exp2(s * score_scale - lse[:, None], spec)
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        dp = _dot(do, v, trans_b=True)
        ds = p * (dp - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    dq = _over_tiles(ranges, tile, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * spec.sm_scale).astype(dq_ref.dtype)


def _dkdv_kernel(
    qtiles_ref,
    qpos_ref,
    qseg_ref,
    kseg_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dk_ref,
    dv_ref,
    *,
    spec: FlashSpec,
    group: int,
):
    cfg = spec.blocks.dkdv
    bq, bk = cfg.block_q, cfg.block_k
    k = k_ref[...]
    v = v_ref[...]
    d = k.shape[-1]
    k0 = pl.program_id(1) * bk
    kpos = (k0 + jnp.arange(bk, dtype=jnp.int32))[:, None]
    kseg = kseg_ref[...][:, None] if spec.has_segments else None
    score_scale = spec.sm_scale * LOG2E
    ranges = tuple(qtiles_ref[i] for i in range(4))  # start, full_start, full_end, end

    # Tiles are (keys, queries): P^T and dS^T come out of the score matmul already in the
    # layout the dV and dK matmuls take, with no transpose in registers.
    def tile(qb, carry, *, head, causal_edge):
        dk, dv = carry
        q0 = pl.multiple_of(qb * bq, bq)
        cols = pl.ds(pl.multiple_of(head * d, d), d)
        q = q_ref[pl.ds(q0, bq), cols]
        do = do_ref[pl.ds(q0, bq), cols]
        lse = lse_ref[head, pl.ds(q0, bq)]
        delta = delta_ref[head, pl.ds(q0, bq)]
        qpos = qpos_ref[pl.ds(q0, bq)][None, :]
        qseg = qseg_ref[pl.ds(q0, bq)][None, :] if spec.has_segments else None
        s_t = _dot(k, q, trans_b=True)
        p_t = _exp2(s_t * score_scale - lse[None, :], spec)
        mask = _visible(
            qpos,
            kpos,
            qseg,
            kseg,
            window=spec.window,
            causal_edge=causal_edge,
            has_segments=spec.has_segments,
        )
        if mask is not None:
            p_t = jnp.where(mask, p_t, 0.0)
        dv = dv + _dot(p_t.astype(do.dtype), do)
        dp_t = _dot(v, do, trans_b=True)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = dk + _dot(ds_t.astype(q.dtype), q)
        return dk, dv

    def head_loop(head, carry):
        return _over_tiles(ranges, functools.partial(tile, head=head), carry)

    zeros = jnp.zeros((bk, d), jnp.float32)
    dk, dv = jax.lax.fori_loop(0, group, head_loop, (zeros, zeros))
    dk_ref[...] = (dk * spec.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def query_tiles_per_key_tile(qpos, *, num_keys, window, block_q, block_k):
    """For each key tile of a sequence of ``num_keys`` keys, which query tiles (of ``block_q``
    rows) can see it, as (B, num_keys / block_k, 4) int32 [start, full_start, full_end, end]:
    tiles in [start, end) see part of it, and those in [full_start, full_end) see all of it
    without a mask.

    Needs positions ascending along the rows (padding rows, -1, last): true both for natural
    order and for compacted routed tokens, so tile minima and maxima are sorted and a binary
    search finds each bound.
    """
    b, t = qpos.shape
    tiles = qpos.reshape(b, t // block_q, block_q)
    empty = tiles.max(axis=-1) < 0
    tile_max = jnp.where(empty, _FAR, tiles.max(axis=-1))
    tile_min = jnp.where(tiles >= 0, tiles, _FAR).min(axis=-1)
    first_key = jnp.arange(num_keys // block_k, dtype=jnp.int32) * block_k
    last_key = first_key + block_k - 1
    search = jax.vmap(
        lambda sorted_, x: jnp.searchsorted(sorted_, x, side="left"), in_axes=(0, None)
    )
    end = jnp.sum(~empty, axis=1, keepdims=True).astype(jnp.int32)
    start = search(tile_max, first_key)  # first tile reaching the key tile
    full_start = search(tile_min, last_key)  # first tile whose rows all follow the key tile
    if window is not None:
        end = jnp.minimum(end, search(tile_min, last_key + window))  # rows past the window
        full_end = search(tile_max, first_key + window)
    else:
        full_end = end
    end = jnp.broadcast_to(end, start.shape)
    start = jnp.minimum(start, end)
    full_start = jnp.clip(full_start, start, end)
    full_end = jnp.clip(full_end, full_start, end)
    return jnp.stack([start, full_start, full_end, end], axis=-1).astype(jnp.int32)


def _query_tile_specs(cfg: BlockConfig, tq: int, tk: int, d: int, group: int):
    """Blocks of a launch over (query head, query tile, batch), heaviest (latest) query tiles
    first: a tile's rows of a (B, Tq, H, D) array, its (B, H, Tq) statistics, and the inputs
    qpos, qseg (the tile's), kseg, q (the tile's), k, v (whole, of the head's GQA group)."""
    nq = tq // cfg.block_q
    tile = pl.BlockSpec((None, cfg.block_q), lambda h, i, bi: (bi, nq - 1 - i))
    rows = pl.BlockSpec((None, cfg.block_q, None, d), lambda h, i, bi: (bi, nq - 1 - i, h, 0))
    stats = pl.BlockSpec((None, None, cfg.block_q), lambda h, i, bi: (bi, h, nq - 1 - i))
    keys = pl.BlockSpec((None, tk, None, d), lambda h, i, bi: (bi, 0, h // group, 0))
    key_segments = pl.BlockSpec((None, tk), lambda h, i, bi: (bi, 0))
    return rows, stats, [tile, tile, key_segments, rows, keys, keys]


def flash_forward(q, k, v, qpos, qseg, kseg, spec: FlashSpec):
    """q (B, Tq, Hq, D) at positions qpos (B, Tq); k, v (B, Tk, Hkv, D); Tq, Tk padded to the
    tiles. Returns o (B, Tq, Hq, D) and the log2-sum-exp (B, Hq, Tq) float32."""
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    cfg = spec.blocks.forward
    rows, stats, inputs = _query_tile_specs(cfg, tq, tk, d, group)
    return pl.pallas_call(
        functools.partial(_forward_kernel, spec=spec),
        grid=(hq, tq // cfg.block_q, b),
        in_specs=inputs,
        out_specs=[rows, stats],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, hq, tq), jnp.float32),
        ],
        compiler_params=_params(cfg),
        interpret=spec.interpret,
        name="l2a_flash_forward",
    )(qpos, qseg, kseg, q, k, v)


def softmax_delta(o, do):
    """Row sums of dO * O, (B, T, H, D) -> (B, H, T) float32: the softmax backward's
    correction term, which both backward kernels read."""
    return jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32), o.astype(jnp.float32))


def flash_backward(q, k, v, delta, lse, do, qpos, qseg, kseg, qtiles, spec: FlashSpec):
    """Gradients (dq, dk, dv) of ``flash_forward``; ``delta`` from ``softmax_delta``.
    ``qtiles`` (B, Tk / block_k, 4) int32 from ``query_tiles_per_key_tile``."""
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv

    cfg = spec.blocks.dq
    rows, stats, inputs = _query_tile_specs(cfg, tq, tk, d, group)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, spec=spec),
        grid=(hq, tq // cfg.block_q, b),
        in_specs=[*inputs, rows, stats, stats],
        out_specs=rows,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(cfg),
        interpret=spec.interpret,
        name="l2a_flash_dq",
    )(qpos, qseg, kseg, q, k, v, do, lse, delta)

    cfg = spec.blocks.dkdv
    nk = tk // cfg.block_k
    # a GQA group's query heads side by side, so one program reads all of them
    q_grouped = q.reshape(b, tq, hkv, group * d)
    do_grouped = do.reshape(b, tq, hkv, group * d)
    lse_grouped = lse.reshape(b, hkv, group, tq)
    delta_grouped = delta.reshape(b, hkv, group, tq)

    def k_rows(h, j, bi):
        return bi, j, h, 0

    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, spec=spec, group=group),
        grid=(hkv, nk, b),
        in_specs=[
            pl.BlockSpec((None, None, 4), lambda h, j, bi: (bi, j, 0)),
            pl.BlockSpec((None, tq), lambda h, j, bi: (bi, 0)),
            pl.BlockSpec((None, tq), lambda h, j, bi: (bi, 0)),
            pl.BlockSpec((None, cfg.block_k), lambda h, j, bi: (bi, j)),
            pl.BlockSpec((None, tq, None, group * d), lambda h, j, bi: (bi, 0, h, 0)),
            pl.BlockSpec((None, cfg.block_k, None, d), k_rows),
            pl.BlockSpec((None, cfg.block_k, None, d), k_rows),
            pl.BlockSpec((None, tq, None, group * d), lambda h, j, bi: (bi, 0, h, 0)),
            pl.BlockSpec((None, None, group, tq), lambda h, j, bi: (bi, h, 0, 0)),
            pl.BlockSpec((None, None, group, tq), lambda h, j, bi: (bi, h, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, cfg.block_k, None, d), k_rows),
            pl.BlockSpec((None, cfg.block_k, None, d), k_rows),
        ],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(cfg),
        interpret=spec.interpret,
        name="l2a_flash_dkdv",
    )(qtiles, qpos, qseg, kseg, q_grouped, k, v, do_grouped, lse_grouped, delta_grouped)
    return dq, dk, dv


def forward_output(q, k, v, qpos, qseg, kseg, spec: FlashSpec):
    """``flash_forward``'s output alone, for a pass that takes no gradient: on Hopper the
    Mosaic GPU kernel where it takes the problem (it keeps no log-sum-exp), else Triton's."""
    if spec.hopper:
        from pallas_kernels import hopper

        rows, keys = q.shape[1], k.shape[1]
        faster = spec.window is not None or keys >= hopper.GLOBAL_MIN_KEYS
        if faster and hopper.takes(q, rows=rows, keys=keys, has_segments=spec.has_segments):
            return hopper.routed_rows_forward(
                q, k, v, qpos, sm_scale=spec.sm_scale, window=spec.window
            )
    return flash_forward(q, k, v, qpos, qseg, kseg, spec)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def flash_attention(q, k, v, qpos, qseg, kseg, qtiles, spec: FlashSpec):
    """Differentiable in q, k, v; the integer inputs describe positions, segments and tiles.
    Evaluated without differentiation it runs ``forward_output``."""
    return forward_output(q, k, v, qpos, qseg, kseg, spec)


def _flash_fwd(q, k, v, qpos, qseg, kseg, qtiles, spec):
    o, lse = flash_forward(q, k, v, qpos, qseg, kseg, spec)
    return o, (q, k, v, o, lse, qpos, qseg, kseg, qtiles)


def _flash_bwd(spec, residuals, do):
    q, k, v, o, lse, qpos, qseg, kseg, qtiles = residuals
    delta = softmax_delta(o, do)
    dq, dk, dv = flash_backward(q, k, v, delta, lse, do, qpos, qseg, kseg, qtiles, spec)
    return dq, dk, dv, None, None, None, None


flash_attention.defvjp(_flash_fwd, _flash_bwd)
