"""The gated half of a SwiGLU feed-forward, ``silu(x @ w_gate) * (x @ w_up)``, as one Mosaic
GPU kernel for Hopper: both products of a tile accumulate side by side in registers and the
gate is applied before anything reaches memory, so the two (tokens, intermediate) products
are never written and read back (XLA runs them as one cuBLAS matmul and a separate
elementwise pass over 3 x tokens x intermediate values).

Persistent: one block per SM walks output tiles (128 rows x 128 columns) in row-major order,
so the weights stay in L2 while the rows stream. Per block a producer warpgroup copies tiles
of x, w_gate and w_up by TMA into a ring of shared-memory stages, running ahead across output
tiles; two computing warpgroups of 64 rows each issue the wgmma pairs, then apply the gate and
store their half of the tile by TMA. Forward only: ``l2a_jax`` runs it where no gradient is
taken (prefill, scoring) and differentiates the jnp form.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.hopper import on_hopper

ROWS = 64  # rows per computing warpgroup (one wgmma M tile)
COMPUTING = 2  # computing warpgroups per block; a third copies
BLOCK_ROWS = ROWS * COMPUTING
BLOCK_COLS = 128  # output columns per tile (the wgmma N of each of the two products)
BLOCK_K = 64  # contraction step (128 bytes of bf16: one swizzle row)


def takes(x, w_gate) -> bool:
    """Whether ``swiglu_up`` runs these shapes: on Hopper, bf16 or f16 x (m, k) and weights
    (k, f) of the same dtype, m a multiple of 128, k of 64, f of 128."""
    if x.ndim != 2 or w_gate.ndim != 2:
        return False
    (m, k), f = x.shape, w_gate.shape[1]
    return (
        on_hopper()
        and x.dtype in (jnp.bfloat16, jnp.float16)
        and w_gate.dtype == x.dtype
        and m % BLOCK_ROWS == 0
        and k % BLOCK_K == 0
        and f % BLOCK_COLS == 0
    )


def swiglu_reference(x, w_gate, w_up):
    """The same contract in jnp, float32 accumulation and gate, rounded once."""
    g = jnp.dot(x, w_gate, preferred_element_type=jnp.float32)
    u = jnp.dot(x, w_up, preferred_element_type=jnp.float32)
    return (jax.nn.silu(g) * u).astype(x.dtype)


@functools.cache
def _num_sms() -> int:
    return int(getattr(jax.devices()[0], "core_count", 0) or 132)


def swiglu_up(x, w_gate, w_up, *, stages: int = 4, blocks: int | None = None):
    """silu(x @ w_gate) * (x @ w_up) for x (m, k) and weights (k, f), in x's dtype, products
    accumulated in float32. Shapes as ``takes`` says; ``blocks`` (default: one per SM) and
    ``stages`` (ring depth) are tuning knobs."""
    m, kdim = x.shape
    f = w_gate.shape[1]
    if (
        w_gate.shape != (kdim, f)
        or w_up.shape != (kdim, f)
        or m % BLOCK_ROWS
        or kdim % BLOCK_K
        or f % BLOCK_COLS
    ):
        raise ValueError(
            f"swiglu_up needs x (m, k) and w_gate, w_up (k, f) with m a multiple of "
            f"{BLOCK_ROWS}, k of {BLOCK_K} and f of {BLOCK_COLS}; got x {x.shape}, w_gate "
            f"{w_gate.shape}, w_up {w_up.shape}"
        )
    dtype = x.dtype
    col_tiles = f // BLOCK_COLS
    tiles = (m // BLOCK_ROWS) * col_tiles
    k_steps = kdim // BLOCK_K
    grid = min(tiles, blocks or _num_sms())

    def body(x_ref, g_ref, u_ref, o_ref, scratch):
        x_smem, g_smem, u_smem, o_smem, x_ready, g_ready, u_ready, free = scratch
        block, wg = lax.axis_index("blocks"), lax.axis_index("wg")
        mine = (tiles - block + grid - 1) // grid  # tiles block, block + grid, ...
        steps = mine * k_steps

        def tile_at(i):
            t = block + i * grid
            return t // col_tiles, lax.rem(t, col_tiles)

        @pl.when(wg < COMPUTING)
        def _compute():
            plgpu.set_max_registers(232, action="increase")

            def one_tile(i, _):
                row_tile, col_tile = tile_at(i)
                first = i * k_steps

                def products(acc_g, acc_u):
                    def step(kk, _):
                        s = first + kk
                        slot = lax.rem(s, stages)
                        plgpu.barrier_wait(x_ready.at[slot])
                        plgpu.barrier_wait(g_ready.at[slot])
                        plgpu.barrier_wait(u_ready.at[slot])
                        rows = x_smem.at[slot, pl.ds(wg * ROWS, ROWS)]
                        plgpu.wgmma(acc_g, rows, g_smem.at[slot])
                        plgpu.wgmma(acc_u, rows, u_smem.at[slot])
                        plgpu.wgmma_wait(2)  # the step before has finished reading its slot

                        @pl.when(kk > 0)
                        def _():
                            plgpu.barrier_arrive(free.at[lax.rem(s - 1, stages)])

                    lax.fori_loop(0, k_steps, step, None)
                    plgpu.wgmma_wait(0)
                    plgpu.barrier_arrive(free.at[lax.rem(first + k_steps - 1, stages)])
                    return acc_g[...], acc_u[...]

                acc = plgpu.ACC((ROWS, BLOCK_COLS), jnp.float32)
                g, u = pl.run_scoped(products, acc, acc)
                h = g / (1.0 + jnp.exp(-g)) * u
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # last tile's store has read
                o_smem.at[wg][...] = h.astype(dtype)
                plgpu.commit_smem()
                at = (
                    pl.ds(row_tile * BLOCK_ROWS + wg * ROWS, ROWS),
                    pl.ds(col_tile * BLOCK_COLS, BLOCK_COLS),
                )
                plgpu.copy_smem_to_gmem(o_smem.at[wg], o_ref.at[at])

            lax.fori_loop(0, mine, one_tile, None)
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == COMPUTING)
        def _stream():
            plgpu.set_max_registers(40, action="decrease")

            def fetch(s):
                row_tile, col_tile = tile_at(s // k_steps)
                kk = lax.rem(s, k_steps)
                slot = lax.rem(s, stages)
                ks = pl.ds(kk * BLOCK_K, BLOCK_K)
                cols = pl.ds(col_tile * BLOCK_COLS, BLOCK_COLS)
                rows = pl.ds(row_tile * BLOCK_ROWS, BLOCK_ROWS)
                plgpu.copy_gmem_to_smem(x_ref.at[rows, ks], x_smem.at[slot], x_ready.at[slot])
                plgpu.copy_gmem_to_smem(g_ref.at[ks, cols], g_smem.at[slot], g_ready.at[slot])
                plgpu.copy_gmem_to_smem(u_ref.at[ks, cols], u_smem.at[slot], u_ready.at[slot])

            for s in range(stages):
                pl.when(s < steps)(functools.partial(fetch, jnp.int32(s)))

            @pl.loop(stages, steps)
            def _(s):
                plgpu.barrier_wait(free.at[lax.rem(s, stages)])
                fetch(s)

    swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    scratch = (
        plgpu.SMEM((stages, BLOCK_ROWS, BLOCK_K), dtype, transforms=swizzled),
        plgpu.SMEM((stages, BLOCK_K, BLOCK_COLS), dtype, transforms=swizzled),
        plgpu.SMEM((stages, BLOCK_K, BLOCK_COLS), dtype, transforms=swizzled),
        plgpu.SMEM((COMPUTING, ROWS, BLOCK_COLS), dtype, transforms=swizzled),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_arrivals=COMPUTING, num_barriers=stages),
    )
    return plgpu.kernel(
        lambda *refs: body(*refs[:4], refs[4:]),
        out_type=jax.ShapeDtypeStruct((m, f), dtype),
        scratch_types=scratch,
        grid=(grid,),
        grid_names=("blocks",),
        num_threads=COMPUTING + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(x, w_gate, w_up)
