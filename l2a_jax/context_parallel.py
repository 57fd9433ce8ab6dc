"""Context (sequence) parallelism: attention over a sequence split into equal contiguous
shards along the mesh axes that the ``seq`` rule names.

Each device holds ``t / n`` consecutive tokens of every row it owns (and its heads, as
without a sequence axis). Everything in a layer but attention works token by token, so XLA
partitions it along the sequence by itself; attention needs other shards' keys:

- **Window branch** (``window`` keys per query): a shard needs only the last ``window - 1``
  keys of the shards before it, the halo. They arrive by ``ppermute`` from the previous
  shard (from several when the window is longer than a shard), so the traffic per layer is
  ``window`` tokens of K and V per device, whatever the length. The local kernel runs over
  ``halo + shard`` keys with the halo's query rows zero and their outputs dropped.
- **Global branch** (every earlier key): K and V are all-gathered along the sequence. With
  GQA they are small: Qwen2.5-0.5B (2 kv heads of 64) holds 512 bytes of bf16 K and V per
  token per layer, so 128K tokens are 64 MiB and 1M tokens 512 MiB, transient, one layer at
  a time, against per-device activations of ``t / n`` tokens times the hidden size and
  more. The local queries sit at their global offset in an otherwise unrouted query array,
  so the routed kernel (which compacts routed queries) computes exactly the rows of this
  shard against every earlier key. That array and the kernel's output are whole-sequence
  sized (``t x hq x d``: 224 MiB at 128K tokens for Qwen2.5-0.5B in bf16, 1.75 GiB at 1M),
  the price of reusing the one-device kernel unchanged; a kernel taking a query offset would
  remove it. A ring (K/V passed shard to shard, overlapped with
  compute) saves that memory at the price of ``n`` dependent steps; at these sizes the
  all-gather costs less. The work is not balanced: the last shard's queries see ``n``
  shards of keys, the first's one (a zig-zag token order would even it out); with ~20% of
  tokens routed the window branch, which is balanced, dominates.

Backward passes come from JAX's transposes of the collectives (``ppermute`` back,
all-gather to reduce-scatter), so gradients equal the unsharded ones.

Segment ids are exchanged with K and V; halo slots before the first shard carry segment 0,
which no real token has here (real ones are shifted by one), so they are never visible.
The sequence length must be a multiple of the shard count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from l2a_jax.sharding import axis_size


def halo_hops(window: int, shard: int, shards: int) -> int:
    """How many preceding shards hold keys a query of this shard can see in the window."""
    return min(-(-(window - 1) // shard), shards - 1)


def _halo(x, axis, shards: int, hops: int, halo: int):
    """The last ``halo`` tokens (along axis 1) of the ``hops`` shards before this one, in
    sequence order (zeros before the first shard). Each shard sends only what is needed: the
    whole shard for the nearer hops, its last ``halo - (hops - 1) * shard`` tokens for the
    farthest."""
    shard = x.shape[1]
    pieces = []
    for s in range(hops, 0, -1):
        need = halo - (hops - 1) * shard if s == hops else shard
        perm = [(i, i + s) for i in range(shards - s)]
        pieces.append(jax.lax.ppermute(x[:, shard - need :], axis, perm))
    return jnp.concatenate(pieces, axis=1)


def context_parallel_attention(
    inner,
    mesh: Mesh,
    seq_axes,
    batch_axes,
    head_axes,
    q,
    k,
    v,
    *,
    segment_ids=None,
    window: int | None = None,
    route=None,
):
    """Causal attention (windowed with ``window``, or only for ``route`` (b, t) rows) of q
    (b, t, hq, d), k/v (b, t, hkv, d) sharded along the sequence over ``seq_axes``.
    ``inner`` is an ``AttentionBackend`` without a mesh that runs each shard's part."""
    b, t = q.shape[:2]
    shards = axis_size(mesh, seq_axes)
    if t % shards:
        raise ValueError(
            f"sequence length {t} does not split over the mesh's {shards} sequence shards; "
            f"use a length that is a multiple of {shards} (or pad the batch)"
        )
    shard = t // shards
    if window is not None and window >= t:
        window = None  # a window as long as the sequence is plain causal attention
    windowed = window is not None
    if windowed and route is not None:
        raise ValueError("routed attention has no window")
    axis = seq_axes if isinstance(seq_axes, str) else tuple(seq_axes)
    segs = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    qkv = PartitionSpec(batch_axes, seq_axes, head_axes, None)
    tokens = PartitionSpec(batch_axes, seq_axes)

    def window_shard(q, k, v, seg):
        hops = halo_hops(window, shard, shards)
        halo = min(window - 1, hops * shard)
        if halo == 0:
            return inner.causal(q, k, v, segment_ids=seg, window=window)
        kk, vv, ss = (
            jnp.concatenate([_halo(x, axis, shards, hops, halo), x], axis=1) for x in (k, v, seg)
        )
        qq = jnp.concatenate([jnp.zeros((q.shape[0], halo, *q.shape[2:]), q.dtype), q], axis=1)
        return inner.causal(qq, kk, vv, segment_ids=ss, window=window)[:, halo:]

    def global_shard(q, k, v, seg, route):
        start = jax.lax.axis_index(axis) * shard
        kk, vv, ss = (jax.lax.all_gather(x, axis, axis=1, tiled=True) for x in (k, v, seg))
        qq = jnp.zeros((q.shape[0], t, *q.shape[2:]), q.dtype)
        qq = jax.lax.dynamic_update_slice_in_dim(qq, q, start, axis=1)
        rr = jnp.zeros((q.shape[0], t), bool)
        rr = jax.lax.dynamic_update_slice_in_dim(rr, route, start, axis=1)
        out = inner.routed(qq, kk, vv, rr, segment_ids=ss)
        return jax.lax.dynamic_slice_in_dim(out, start, shard, axis=1)

    def local(q, k, v, seg, *route):
        seg = seg + 1  # 0 marks the halo before the first shard
        if windowed:
            return window_shard(q, k, v, seg)
        route = route[0] if route else jnp.ones(q.shape[:2], bool)
        return global_shard(q, k, v, seg, route)

    extra = () if route is None else (route,)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(qkv, qkv, qkv, tokens, *(tokens for _ in extra)),
        out_specs=qkv,
        check_vma=False,  # pallas_call carries no varying-manual-axes types
    )(q, k, v, segs, *extra)
