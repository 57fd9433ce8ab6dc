"""The Mosaic GPU forward for Hopper (``pallas_kernels.hopper``): its tile plan against brute
force, its lowering (which runs here without a GPU), and on a Hopper GPU its values against
float64 NumPy and the window op that picks it against cuDNN."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kernels import make_inputs, numpy_attention

from pallas_kernels import hopper
from pallas_kernels.attention import compact_routed


def routed_positions(rng, b, rows, t, counts):
    route = np.zeros((b, t), bool)
    for row, count in enumerate(counts):
        route[row, rng.choice(t, count, replace=False)] = True
    return compact_routed(jnp.asarray(route), rows)[0]


@pytest.mark.parametrize("computing", [2, 3])
@pytest.mark.parametrize("window", [None, 1, 100, 300, 5000])
@pytest.mark.parametrize("block_k", [64, 128])
def test_key_tile_plan_matches_brute_force(window, block_k, computing, rng):
    """Per warpgroup of rows: [lo, hi) is exactly the tiles holding a key some row sees,
    every row sees all of [f0, f1), those are all such tiles when no row is padding, and
    none when one is; per block: the union of its warpgroups' ranges. Rows that do not fill
    the last block (512 for blocks of 3 x 64) leave warpgroups of padding past them."""
    t = 2048
    cases = [routed_positions(rng, 3, 512, t, (200, 0, 512))]  # padding, none, all
    cases.append(jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (1, t)))  # a window op
    for qpos in cases:
        plan = hopper.key_tile_plan(qpos, block_k, window, computing=computing)
        rows, blocks = (np.asarray(x) for x in plan)
        pos = np.asarray(qpos)
        whole_blocks = -(-pos.shape[1] // (hopper.ROWS * computing))
        assert rows.shape[1] == whole_blocks * computing and blocks.shape[1] == whole_blocks
        pos = np.pad(
            pos, ((0, 0), (0, rows.shape[1] * hopper.ROWS - pos.shape[1])), constant_values=-1
        )
        keys = np.arange(t)
        for bi in range(pos.shape[0]):
            for g in range(rows.shape[1]):
                p = pos[bi, g * hopper.ROWS : (g + 1) * hopper.ROWS]
                real = p[p >= 0]
                seen = (keys[None] <= real[:, None]) & (
                    True if window is None else keys[None] > real[:, None] - window
                )
                lo, f0, f1, hi = rows[bi, g]
                assert lo <= f0 <= f1 <= hi
                block_lo, block_hi = blocks[bi, g // computing]
                if len(real) == 0:
                    assert lo == hi == block_hi, "a warpgroup of padding sits out its block"
                    continue
                by_tile = seen.reshape(len(real), -1, block_k)
                some = np.flatnonzero(by_tile.any(axis=(0, 2)))
                whole = np.flatnonzero(by_tile.all(axis=(0, 2)))
                assert (lo, hi) == (some[0], some[-1] + 1), (bi, g)
                assert block_lo <= lo and hi <= block_hi
                assert set(range(f0, f1)) <= set(whole)
                if (p >= 0).all():
                    assert f1 - f0 == len(whole)
                else:
                    assert f0 == f1, "padding rows must be masked in every tile"


@pytest.mark.parametrize("d,window,dtype", [(64, None, jnp.bfloat16), (128, 256, jnp.float16)])
def test_kernel_lowers_for_cuda(d, window, dtype):
    """The whole kernel traces and lowers through Mosaic GPU for a CUDA target, GPU or not."""
    q = jax.ShapeDtypeStruct((1, 256, 4, d), dtype)
    k = jax.ShapeDtypeStruct((1, 512, 2, d), dtype)
    qpos = jax.ShapeDtypeStruct((1, 256), jnp.int32)
    fn = jax.jit(functools.partial(hopper.routed_rows_forward, sm_scale=d**-0.5, window=window))
    text = fn.trace(q, k, k, qpos).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_shapes_are_checked():
    q = jnp.zeros((1, 100, 4, 64), jnp.bfloat16)
    k = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="rows a multiple of 64"):
        hopper.routed_rows_forward(q, k, k, jnp.zeros((1, 100), jnp.int32), sm_scale=0.125)


def on_hopper():
    if not hopper.on_hopper():
        pytest.skip("needs a Hopper GPU")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "b,t,rows,hq,hkv,d,counts,window,dtype",
    [
        (2, 1000, 384, 4, 2, 64, (300, 0), None, jnp.bfloat16),  # padding; a row of none
        (1, 1000, 320, 4, 2, 64, (250,), None, jnp.bfloat16),  # a block part past the rows
        (1, 128, 64, 2, 1, 64, (50,), None, jnp.bfloat16),  # one key tile: overlap has none
        (1, 600, 320, 4, 2, 128, (250,), None, jnp.float16),  # the same with two, in turns
        (1, 512, 512, 2, 2, 128, (512,), None, jnp.float16),  # all routed
        (1, 1024, 1024, 7, 1, 64, (1024,), 200, jnp.bfloat16),  # a window op's rows
        (2, 512, 256, 4, 4, 128, (100, 256), 64, jnp.bfloat16),  # window, routed rows
    ],
)
def test_values_against_numpy(b, t, rows, hq, hkv, d, counts, window, dtype, rng):
    on_hopper()
    q, k, v, _ = make_inputs(rng, b, t, hq, hkv, d, dtype, False)
    qpos = routed_positions(rng, b, rows, t, counts)
    tk = -(-t // hopper.BLOCK_K) * hopper.BLOCK_K
    pad = ((0, 0), (0, tk - t), (0, 0), (0, 0))
    q_rows = jnp.take_along_axis(q, jnp.maximum(qpos, 0)[:, :, None, None], axis=1)
    out = hopper.routed_rows_forward(
        q_rows, jnp.pad(k, pad), jnp.pad(v, pad), qpos, sm_scale=d**-0.5, window=window
    )
    out = np.asarray(out, np.float64)
    padding = np.asarray(qpos) < 0
    assert not out[padding].any(), "padding rows must get exactly 0"
    full = numpy_attention(q, k, v, window=window)
    want = np.take_along_axis(full, np.maximum(np.asarray(qpos), 0)[:, :, None, None], axis=1)
    want[padding] = 0
    np.testing.assert_allclose(out, want, atol=1e-2, rtol=2.0**-7)


@pytest.mark.gpu
def test_window_op_runs_it_unless_differentiated(rng):
    """The model's windowed attention on Hopper: evaluated, the Mosaic GPU kernel; under
    jax.grad, cuDNN's forward and backward, so gradients are cuDNN's exactly."""
    on_hopper()
    from l2a_jax.attention import _cudnn_causal, _window_hopper_unless_differentiated

    q, k, v, _ = make_inputs(rng, 1, 1024, 4, 2, 64, jnp.bfloat16, False)
    ours = functools.partial(_window_hopper_unless_differentiated, window=300)
    cudnn = functools.partial(_cudnn_causal, local_window_size=(299, 0))
    text = jax.jit(ours).lower(q, k, v).as_text()
    assert "mosaic_gpu" in text and "cudnn" not in text
    want = numpy_attention(q, k, v, window=300)
    np.testing.assert_allclose(np.asarray(ours(q, k, v), np.float64), want, atol=1e-2, rtol=2**-7)
    w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)

    got = jax.grad(loss(ours), argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(loss(cudnn), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(r))
