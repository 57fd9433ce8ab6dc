"""Causal attention forward as a Mosaic GPU kernel for Hopper: TMA copies, asynchronous
wgmma and warp specialisation (one warpgroup streams keys and values into a ring of shared
memory buffers; warpgroups of 64 query rows each compute: three side by side at head_dim 64,
two at 128 taking turns on the tensor cores so one's softmax overlaps the other's matrix
products). At head_dim 64 each warpgroup also overlaps on its own: a key tile's scores and
softmax run while the previous tile's values are multiplied in.

One kernel serves both L2A ops: query rows at given positions (ascending, padding -1 last)
against all earlier keys (the routed global branch, its queries compacted) or against a
window of them (the window branch, every token a row). Forward only, without the
log-sum-exp: ``flash.forward_output`` runs it for passes that take no gradient (prefill,
scoring) on Hopper; differentiated passes keep the Triton kernels and their backward.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

BLOCK_K = 128  # keys per tile
# Global (unwindowed) attention runs here from this many keys: on an H200 (14/2 heads, d 64,
# a fifth of the rows routed) it beat the Triton forward by 15% at 32K keys and 12% at 128K;
# shorter sequences were not measured and keep the Triton forward.
GLOBAL_MIN_KEYS = 32768
ROWS = 64  # query rows per computing warpgroup (one wgmma M tile)
_M_INIT = -1e30  # finite: a row with nothing visible yet keeps exp2(m - m_new) finite


def computing_warpgroups(d: int) -> int:
    """Computing warpgroups per block (one more copies keys and values). At head_dim 64,
    three with 160 registers a thread, each going at its own pace: on an H200 (14/2 heads, a
    fifth of the rows routed) 7% faster than two taking turns at 128K (12.67 against 13.60 ms
    routed, 4.33 against 4.59 with a 4096 window) and 5% at 32K. At 128 the accumulators need
    two with 232 registers, which take turns on the tensor cores (without turns, 8% slower at
    64)."""
    return 3 if d <= 64 else 2


@functools.cache
def on_hopper() -> bool:
    """Whether the default backend is a GPU of compute capability 9 (H100, H200)."""
    if jax.default_backend() != "gpu":
        return False
    return all(str(getattr(d, "compute_capability", "")).startswith("9.") for d in jax.devices())


def takes(q, *, rows: int, keys: int, has_segments: bool) -> bool:
    """Whether ``routed_rows_forward`` runs this problem: on Hopper, bf16 or f16, head_dim 64
    or 128 (its shared memory holds no more), no packed segments, rows and keys padded to its
    tiles (a block's last warpgroups may lie past the rows)."""
    d = q.shape[-1]
    return (
        on_hopper()
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and d in (64, 128)
        and not has_segments
        and rows % ROWS == 0
        and keys % BLOCK_K == 0
    )


def key_tile_plan(qpos: jax.Array, block_k: int, window: int | None = None, *, computing: int):
    """The key tiles each block of ``computing`` warpgroups of query rows visits, from the
    rows' positions (B, R), R a multiple of 64.

    Per warpgroup's 64 rows (B, W, 4) int32 ``lo, f0, f1, hi``: tiles [lo, hi) hold a key
    some row sees; within them every row sees all of [f0, f1) (no mask needed there). Per
    block of ``64 * computing`` rows (B, W / computing, 2) int32: the tiles it streams, the
    union of its warpgroups' ranges. W is R / 64 rounded up to whole blocks; warpgroups past
    the rows count as padding. Rows of padding alone (-1) visit nothing; a warpgroup holding
    any padding row masks every tile, which keeps padding rows at exactly zero.
    """
    b, r = qpos.shape
    pad = -r % (ROWS * computing)
    if pad:
        qpos = jnp.pad(qpos, ((0, 0), (0, pad)), constant_values=-1)
        r += pad
    pos = qpos.reshape(b, r // ROWS, ROWS)
    last = jnp.max(pos, axis=-1)
    lowest = jnp.min(pos, axis=-1)  # -1 when the rows hold padding
    first = jnp.min(jnp.where(pos >= 0, pos, jnp.iinfo(jnp.int32).max), axis=-1)
    some = last >= 0
    hi = jnp.where(some, last // block_k + 1, 0)
    if window is None:
        lo = f0 = jnp.zeros_like(hi)
    else:
        lo = jnp.where(some, jnp.maximum(first - window + 1, 0) // block_k, 0)
        f0 = -(-jnp.maximum(last - window + 1, 0) // block_k)
    f1 = jnp.where(lowest >= 0, (lowest + 1) // block_k, 0)
    f0 = jnp.minimum(jnp.maximum(f0, lo), hi)
    f1 = jnp.minimum(jnp.maximum(f1, f0), hi)
    pair = (b, r // (ROWS * computing), computing)
    block_lo = jnp.min(jnp.where(some, lo, jnp.iinfo(jnp.int32).max).reshape(pair), axis=-1)
    block_hi = jnp.max(hi.reshape(pair), axis=-1)
    block_lo = jnp.minimum(block_lo, block_hi)
    # a warpgroup without rows of its own sits out its block's whole range
    empty = ~some
    spread = jnp.repeat(block_hi, computing, axis=1)
    lo, f0, f1, hi = (jnp.where(empty, spread, x) for x in (lo, f0, f1, hi))
    rows = jnp.stack([lo, f0, f1, hi], axis=-1).astype(jnp.int32)
    return rows, jnp.stack([block_lo, block_hi], axis=-1).astype(jnp.int32)


def routed_rows_forward(
    q,
    k,
    v,
    qpos,
    *,
    sm_scale: float,
    window: int | None = None,
    block_k: int = BLOCK_K,
    stages: int | None = None,
):
    """o (B, R, Hq, D) for query rows q (B, R, Hq, D) at positions qpos (B, R), ascending
    along the rows with padding (-1) last; k, v (B, Tk, Hkv, D). Key j is visible to a row
    at position i iff j <= i (and i - window < j with ``window``). R a multiple of 64, Tk
    of ``block_k``, D 64 or 128; bf16 or f16. Padding rows give 0."""
    b, r, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    if r % ROWS or tk % block_k or d not in (64, 128) or hq % hkv:
        raise ValueError(
            f"routed_rows_forward needs rows a multiple of {ROWS}, keys of "
            f"{block_k}, head_dim 64 or 128 and query heads a multiple of key heads; got q "
            f"{q.shape}, k {k.shape}"
        )
    group = hq // hkv
    dtype = q.dtype
    stages = stages or (3 if d <= 64 else 2)  # three stages of 128 x 128 tiles overflow SMEM
    computing = computing_warpgroups(d)
    turns = computing == 2  # the computing warpgroups take turns on the tensor cores
    registers, streaming_registers = (232, 40) if turns else (160, 24)
    # at head_dim 64 each warpgroup also overlaps its own work: tile j's scores and softmax
    # run while tile j - 1's values are multiplied in. On an H200 (14/2 heads, a fifth of
    # the rows routed) 3% faster at 128K for global attention and 6% with a 4096 window (5-6%
    # at 32K); with turns the two warpgroups overlap each other already
    overlap = not turns
    row_plan, block_plan = key_tile_plan(qpos, block_k, window, computing=computing)
    score_scale = sm_scale * math.log2(math.e)
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    num_tiles = -(-r // (ROWS * computing))

    def body(row_plan_ref, block_plan_ref, qpos_ref, q_ref, k_ref, v_ref, o_ref, scratch):
        qo_smem, k_smem, v_smem, pos_smem, q_ready, pos_ready = scratch[:6]
        k_ready, v_ready, k_free, v_free, turn = scratch[6:]
        head, bi = lax.axis_index("heads"), lax.axis_index("b")
        # the longest rows first, tiles varying fastest across the grid: each wave of blocks
        # then holds one or two heads' whole range of row lengths (and their kv heads' keys),
        # which balanced the causal work 20% better at 32K than heads varying fastest
        tile = num_tiles - 1 - lax.axis_index("tiles")
        wg = lax.axis_index("wg")
        block_lo, block_hi = block_plan_ref[bi, tile, 0], block_plan_ref[bi, tile, 1]

        def slot_of(j):  # the ring buffer slot of key tile j
            return lax.rem(j - block_lo, stages)

        def take_turn():
            if not turns:
                return
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

        @pl.when(wg < computing)
        def _compute():
            plgpu.set_max_registers(registers, action="increase")
            mine = tile * computing + wg
            lo, f0 = row_plan_ref[bi, mine, 0], row_plan_ref[bi, mine, 1]
            f1, hi = row_plan_ref[bi, mine, 2], row_plan_ref[bi, mine, 3]
            row0 = mine * ROWS
            q_smem, p_smem = qo_smem.at[wg], pos_smem.at[wg]
            inside = row0 < r  # else past the rows: it sits out the block (its plan says so)

            @pl.when(inside)
            def _():
                plgpu.copy_gmem_to_smem(
                    q_ref.at[bi, pl.ds(row0, ROWS), head], q_smem, q_ready.at[wg]
                )
                plgpu.copy_gmem_to_smem(
                    qpos_ref.at[bi, pl.ds(row0, ROWS)], p_smem, pos_ready.at[wg]
                )
                plgpu.barrier_wait(q_ready.at[wg])
                plgpu.barrier_wait(pos_ready.at[wg])

            row_pos = plgpu.load(p_smem, layout=row_layout, optimized=False)

            def sit_out(j, _, *, wait: bool):
                # a tile only other warpgroups need: follow the ring's phases, release the
                # tile and (with turns) keep taking them so the other is never left waiting
                slot = slot_of(j)
                if wait:
                    plgpu.barrier_wait(k_ready.at[slot])
                    plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_arrive(k_free.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                take_turn()
                take_turn()

            lax.fori_loop(block_lo, lo, functools.partial(sit_out, wait=True), None)

            @pl.when(hi > lo)
            def _():
                plgpu.barrier_wait(k_ready.at[slot_of(lo)])

            pl.when(wg == 1)(take_turn)  # with turns, the two alternate from here on

            def softmax(j, s, m, denom, *, masked: bool):
                """Tile j's scores s to probabilities (float32) against the running row
                maxima m (scaled to base 2) and sums denom; and alpha, by which the values
                so far shrink."""
                if masked:
                    kpos = j * block_k + plgpu.broadcasted_iota(
                        jnp.int32, (ROWS, block_k), 1, layout=plgpu.Layout.WGMMA
                    )
                    qpos_tile = lax.broadcast_in_dim(row_pos, (ROWS, block_k), [0])
                    seen = kpos <= qpos_tile
                    if window is not None:
                        seen &= kpos > qpos_tile - window
                    s = jnp.where(seen, s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(axis=1) * score_scale)
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(s * score_scale - lax.broadcast_in_dim(m_new, s.shape, [0]))
                denom = denom * alpha + p.sum(axis=1)
                return m_new, alpha, denom, p

            def scale_rows(acc, alpha):
                return acc * lax.broadcast_in_dim(alpha, acc.shape, [0])

            def wait_next_keys(j):
                @pl.when(j + 1 < hi)
                def _():
                    plgpu.barrier_wait(k_ready.at[slot_of(j + 1)])

            def fresh_scores(slot, acc_ref):
                plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))

            def tile_scores(slot):  # a tile's scores, waited for (with turns, then the other's)
                def scores(acc_ref):
                    fresh_scores(slot, acc_ref)
                    take_turn()
                    return acc_ref[...]

                s = pl.run_scoped(scores, plgpu.ACC((ROWS, block_k), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                return s

            def step(j, carry, *, masked: bool):  # two warpgroups taking turns (head_dim 128)
                acc, m, denom = carry
                slot = slot_of(j)
                s = tile_scores(slot)
                m_new, alpha, denom, p = softmax(j, s, m, denom, masked=masked)
                acc, p_lo = scale_rows(acc, alpha), p.astype(dtype)
                acc, denom, m_new, p_lo = lax.optimization_barrier((acc, denom, m_new, p_lo))
                plgpu.barrier_arrive(turn)  # softmax done: the other may go on
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_wait(turn)  # our turn on the tensor cores again

                def values(acc_ref):
                    plgpu.wgmma(acc_ref, p_lo, v_smem.at[slot])
                    wait_next_keys(j)

                acc = pl.run_state(values)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, denom

            # overlapped steps (head_dim 64): tile j's scores and softmax run while tile
            # j - 1's values do (a warpgroup keeps the tensor cores busy on its own); the
            # carry holds tile j - 1's probabilities, whose values are not yet in acc
            def first(j, carry):  # the first tile: scores and softmax alone
                acc, m, denom, _ = carry
                s = tile_scores(slot_of(j))
                m, _, denom, p = softmax(j, s, m, denom, masked=True)
                wait_next_keys(j)
                return acc, m, denom, p.astype(dtype)

            def overlapped_step(j, carry, *, masked: bool):
                acc, m, denom, p_prev = carry
                slot, prev = slot_of(j), slot_of(j - 1)

                def both(s_ref, o_ref):
                    # no register that an issued wgmma reads is written before it is waited
                    # for (ptxas would serialize every wgmma in the kernel): acc goes in
                    # first, and the probabilities in the dtype replace p_prev's after
                    o_ref[...] = acc
                    fresh_scores(slot, s_ref)
                    plgpu.barrier_wait(v_ready.at[prev])
                    plgpu.wgmma(o_ref, p_prev, v_smem.at[prev])
                    s = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)  # the scores alone
                    plgpu.barrier_arrive(k_free.at[slot])
                    m_new, alpha, den, p = softmax(j, s, m, denom, masked=masked)
                    wait_next_keys(j)
                    o = plgpu.wgmma_accumulator_load(o_ref, wait_n=0)
                    return scale_rows(o, alpha), m_new, den, p.astype(dtype)

                acc_types = (plgpu.ACC((ROWS, block_k), jnp.float32), plgpu.ACC((ROWS, d)))
                out = pl.run_scoped(both, *acc_types)
                plgpu.barrier_arrive(v_free.at[prev])
                return out

            def last(j, carry):  # the last tile's values
                acc, m, denom, p_prev = carry
                slot = slot_of(j)
                plgpu.barrier_wait(v_ready.at[slot])

                def values(o_ref):
                    plgpu.wgmma(o_ref, p_prev, v_smem.at[slot])

                acc = pl.run_state(values)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m, denom, p_prev

            acc = plgpu.layout_cast(jnp.zeros((ROWS, d), jnp.float32), plgpu.Layout.WGMMA)
            m = plgpu.layout_cast(jnp.full((ROWS,), _M_INIT, jnp.float32), row_layout)
            denom = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), row_layout)
            if overlap:
                p = plgpu.layout_cast(jnp.zeros((ROWS, block_k), dtype), plgpu.Layout.WGMMA)
                carry = lax.fori_loop(lo, jnp.minimum(lo + 1, hi), first, (acc, m, denom, p))
                masked_step = functools.partial(overlapped_step, masked=True)
                after = lo + 1  # the first tile is done: f0, f1 below count from here
                carry = lax.fori_loop(after, f0, masked_step, carry)
                carry = lax.fori_loop(
                    jnp.maximum(f0, after),
                    f1,
                    functools.partial(overlapped_step, masked=False),
                    carry,
                )
                carry = lax.fori_loop(jnp.maximum(f1, after), hi, masked_step, carry)
                acc, _, denom, _ = lax.fori_loop(jnp.maximum(hi - 1, lo), hi, last, carry)
            else:
                carry = (acc, m, denom)
                masked_step = functools.partial(step, masked=True)
                carry = lax.fori_loop(lo, f0, masked_step, carry)
                carry = lax.fori_loop(f0, f1, functools.partial(step, masked=False), carry)
                acc, _, denom = lax.fori_loop(f1, hi, masked_step, carry)
            # with turns the other warpgroup's steps keep this one in phase with the ring;
            # without, it follows the ring's phases itself
            lax.fori_loop(hi, block_hi, functools.partial(sit_out, wait=not turns), None)
            pl.when(wg == 0)(take_turn)

            inv = 1.0 / jnp.where(denom > 0, denom, 1.0)
            q_smem[...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(dtype)
            plgpu.commit_smem()

            @pl.when(inside)
            def _():
                plgpu.copy_smem_to_gmem(q_smem, o_ref.at[bi, pl.ds(row0, ROWS), head])
                plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == computing)
        def _stream():
            plgpu.set_max_registers(streaming_registers, action="decrease")
            kv_head = lax.div(head, jnp.int32(group))

            def fetch(j, *, wait: bool):
                slot = slot_of(j)
                at = (bi, pl.ds(j * block_k, block_k), kv_head)
                if wait:
                    plgpu.barrier_wait(k_free.at[slot])
                plgpu.copy_gmem_to_smem(k_ref.at[at], k_smem.at[slot], k_ready.at[slot])
                if wait:
                    plgpu.barrier_wait(v_free.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[at], v_smem.at[slot], v_ready.at[slot])

            for i in range(stages):
                j = block_lo + i
                pl.when(j < block_hi)(functools.partial(fetch, j, wait=False))

            @pl.loop(block_lo + stages, block_hi)
            def _(j):
                fetch(j, wait=True)

    tiles = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    scratch = (
        plgpu.SMEM((computing, ROWS, d), dtype, transforms=tiles),
        plgpu.SMEM((stages, block_k, d), dtype, transforms=tiles),
        plgpu.SMEM((stages, block_k, d), dtype, transforms=tiles),
        plgpu.SMEM((computing, ROWS), jnp.int32),
        plgpu.Barrier(num_barriers=computing),
        plgpu.Barrier(num_barriers=computing),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_arrivals=computing, num_barriers=stages),
        plgpu.Barrier(num_arrivals=computing, num_barriers=stages),
        plgpu.Barrier(num_arrivals=computing),
    )
    return plgpu.kernel(
        lambda *refs: body(*refs[:7], refs[7:]),
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        scratch_types=scratch,
        grid=(num_tiles, hq, b),
        grid_names=("tiles", "heads", "b"),
        num_threads=computing + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(row_plan, block_plan, qpos.astype(jnp.int32), q, k, v)
