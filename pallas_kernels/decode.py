"""Decode attention: one new query per row against a KV cache (Pallas, Triton lowering), with
rows that skip the read.

Flash-decoding: the cache of each (row, kv head) is cut into ``splits`` contiguous chunks, one
program each, so a batch of one still fills the GPU; each program keeps the running max, sum
and weighted values of its chunk for all query heads of the GQA group at once (the group's
queries are the rows of one small matmul), and XLA merges the chunks. A program reads only the
key tiles below its row's ``num_keys``; a row whose ``route`` is false reads none, so its
programs return at once and its output is zero. Semantics: ``reference.
decode_attention_reference``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash import _M_INIT, LOG2E

# programs to aim for: a few per streaming multiprocessor of an H100/H200 (132)
_TARGET_PROGRAMS = 264


def _pow2_at_least(n: int, floor: int) -> int:
    return max(floor, 1 << (n - 1).bit_length())


def _decode_kernel(info_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, *, block, chunk, scale):
    num_keys, routed = info_ref[0], info_ref[1] > 0
    first = pl.program_id(2) * chunk
    last = jnp.minimum(first + chunk, (num_keys + block - 1) // block)
    last = jnp.where(routed, last, first)  # a row not routed reads nothing
    q = q_ref[...]

    def tile(kb, carry):
        acc, m, denom = carry
        k0 = pl.multiple_of(kb * block, block)
        valid = (k0 + jnp.arange(block, dtype=jnp.int32)) < num_keys
        k = k_ref[pl.ds(k0, block), :]
        v = jnp.where(valid[:, None], v_ref[pl.ds(k0, block), :], jnp.zeros((), v_ref.dtype))
        s = plgpu.dot(q, k, trans_b=True) * scale
        s = jnp.where(valid[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        denom = denom * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v)
        return acc, m_new, denom

    rows, d = q.shape
    carry = (
        jnp.zeros((rows, d), jnp.float32),
        jnp.full((rows,), _M_INIT, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    acc, m, denom = jax.lax.fori_loop(first, last, tile, carry)
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = denom


def decode_attention(
    q,
    k,
    v,
    num_keys,
    *,
    route=None,
    sm_scale: float | None = None,
    block_k: int | None = None,
    splits: int | None = None,
    interpret: bool | None = None,
):
    """q (B, 1, Hq, D) against the first ``num_keys`` (B,) slots of the caches k, v
    (B, S, Hkv, D) -> (B, 1, Hq, D); rows with ``route`` (B,) false give zero without reading.
    A cache whose length S is not a multiple of ``block_k`` is padded (a copy: allocate caches
    in multiples of 128 slots)."""
    b, one, hq, d = q.shape
    _, s, hkv, _ = k.shape
    if one != 1 or k.shape != v.shape or k.shape[0] != b or k.shape[3] != d or hq % hkv:
        raise ValueError(
            f"decode_attention takes q (B, 1, Hq, D) and caches (B, S, Hkv, D) with Hq a "
            f"multiple of Hkv; got q {q.shape}, k {k.shape}, v {v.shape}"
        )
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    block = block_k or (16 if interpret else 64)
    if s % block:
        pad = [(0, 0), (0, -s % block), (0, 0), (0, 0)]
        k, v = jnp.pad(k, pad), jnp.pad(v, pad)
        s = k.shape[1]
    tiles = s // block
    if splits is None:
        splits = max(1, min(tiles, math.ceil(_TARGET_PROGRAMS / (b * hkv))))
    chunk = math.ceil(tiles / splits)
    splits = math.ceil(tiles / chunk)
    group = hq // hkv
    rows = _pow2_at_least(group, 16)  # a matmul needs >= 16 rows: pad the group's queries
    qg = q.reshape(b, hkv, group, d)
    qg = jnp.pad(qg, [(0, 0), (0, 0), (0, rows - group), (0, 0)])
    routed = jnp.ones((b,), jnp.int32) if route is None else route.astype(jnp.int32)
    info = jnp.stack([num_keys.astype(jnp.int32), routed], axis=1)
    scale = (d**-0.5 if sm_scale is None else sm_scale) * LOG2E

    part = pl.BlockSpec((None, None, None, rows, d), lambda i, h, c: (i, h, c, 0, 0))
    stat = pl.BlockSpec((None, None, None, rows), lambda i, h, c: (i, h, c, 0))
    cache = pl.BlockSpec((None, s, None, d), lambda i, h, c: (i, 0, h, 0))
    acc, m, denom = pl.pallas_call(
        functools.partial(_decode_kernel, block=block, chunk=chunk, scale=scale),
        grid=(b, hkv, splits),
        in_specs=[
            pl.BlockSpec((None, 2), lambda i, h, c: (i, 0)),
            pl.BlockSpec((None, None, rows, d), lambda i, h, c: (i, h, 0, 0)),
            cache,
            cache,
        ],
        out_specs=[part, stat, stat],
        out_shape=[
            jax.ShapeDtypeStruct((b, hkv, splits, rows, d), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, splits, rows), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, splits, rows), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="l2a_decode_attention",
    )(info, qg, k, v)
    # merge the chunks: rescale each to the common max (log2 units), then normalise
    top = jnp.max(m, axis=2, keepdims=True)
    weight = jnp.exp2(m - top)
    denom = jnp.sum(weight * denom, axis=2)
    out = jnp.sum(weight[..., None] * acc, axis=2)
    out = out / jnp.where(denom > 0, denom, 1.0)[..., None]
    return out[:, :, :group].reshape(b, 1, hq, d).astype(q.dtype)
