"""Pallas attention kernels against float64 NumPy (values) and jax.grad of the jnp reference
(gradients). Every case runs in interpret mode (CPU included) and natively on a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import has_gpu

from pallas_kernels import (
    AttentionBlocks,
    BlockConfig,
    conditional_global_attention,
    conditional_global_attention_reference,
    default_blocks,
    routed_rows_attention,
    routed_rows_attention_reference,
    sliding_window_attention,
    sliding_window_attention_reference,
)
from pallas_kernels.attention import compact_routed

MODES = ["interpret", pytest.param("native", marks=pytest.mark.gpu)]


def numpy_row(q, k, v, bi, i, *, window=None, segment_ids=None):
    """float64 output of query row i of batch row bi, all heads: (Hq, D). Inputs are float64
    NumPy arrays; written independently of the jnp reference."""
    hq, d = q.shape[2:]
    group = hq // k.shape[2]
    lo = 0 if window is None else max(0, i - window + 1)
    keys = np.arange(lo, i + 1)
    if segment_ids is not None:
        keys = keys[segment_ids[bi, keys] == segment_ids[bi, i]]
    out = np.zeros((hq, d))
    for h in range(hq):
        s = k[bi, keys, h // group] @ q[bi, i, h] / np.sqrt(d)
        p = np.exp(s - s.max())
        out[h] = (p / p.sum()) @ v[bi, keys, h // group]
    return out


def assert_rows_match_numpy(out, f64, rows, routed, window):
    """Sampled rows of one op's output for batch row 0 against float64 NumPy: the window op
    when ``window`` is given, else the global op, whose rows not ``routed`` must be exactly 0."""
    for i in rows:
        if window is None and not routed[i]:
            assert not out[0, i].any(), f"skipped row {i} must be 0"
            continue
        want = numpy_row(*f64, 0, i, window=window)
        np.testing.assert_allclose(out[0, i], want, atol=1e-2, rtol=2.0**-7, err_msg=f"row {i}")


def numpy_attention(q, k, v, *, window=None, route=None, segment_ids=None):
    """float64 definition of both ops: every row, zero where ``route`` is false."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t = q.shape[:2]
    out = np.zeros(q.shape)
    for bi in range(b):
        for i in range(t):
            if route is None or route[bi, i]:
                out[bi, i] = numpy_row(q, k, v, bi, i, window=window, segment_ids=segment_ids)
    return out


def make_inputs(rng, b, t, hq, hkv, d, dtype, segments):
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d)), dtype) for h in (hq, hkv, hkv))
    seg = None
    if segments:  # packed documents of random lengths, different per row
        seg = jnp.asarray(np.sort(rng.integers(0, 4, (b, t)), axis=1), jnp.int32)
    return q, k, v, seg


def run_mode(mode):
    if mode == "native" and not has_gpu():
        pytest.skip("needs a GPU")
    return mode == "interpret"


# (output atol, gradient atol, rtol). bf16 results are stored in bf16, whose spacing is 2^-7 of
# the value, so a large gradient entry one bf16 step away from the f32 reference is correct:
# the relative term allows exactly one such step.
TOL = {jnp.float32: (1e-5, 1e-4, 0.0), jnp.bfloat16: (1e-2, 2e-2, 2.0**-7)}

SWA_CASES = [
    # b, t, hq, hkv, d, window, segments, dtype
    (1, 1, 4, 4, 64, 1, False, jnp.float32),
    (2, 200, 4, 1, 64, 37, True, jnp.float32),
    (1, 1000, 7, 1, 64, 300, False, jnp.float32),
    (2, 200, 2, 2, 128, 500, True, jnp.float32),
    (1, 1000, 4, 4, 64, 1, True, jnp.float32),
    (2, 333, 8, 2, 64, 64, False, jnp.bfloat16),
]

GLOBAL_CASES = [
    # b, t, hq, hkv, d, route densities per row, segments, dtype
    (1, 1, 4, 4, 64, (1.0,), False, jnp.float32),
    (2, 200, 4, 1, 64, (0.2, 0.2), True, jnp.float32),
    (1, 1000, 7, 1, 64, (0.2,), False, jnp.float32),
    (2, 200, 4, 2, 128, (0.0, 0.0), False, jnp.float32),
    (2, 1000, 4, 4, 64, (1.0, 1.0), True, jnp.float32),
    (2, 200, 4, 2, 64, (0.9, 0.05), False, jnp.float32),
    (2, 333, 8, 2, 64, (0.2, 0.5), True, jnp.bfloat16),
]


def make_route(rng, densities, t):
    return jnp.asarray(np.stack([rng.random(t) < p for p in densities]))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("b,t,hq,hkv,d,window,segments,dtype", SWA_CASES)
def test_sliding_window_values(mode, b, t, hq, hkv, d, window, segments, dtype, rng):
    interpret = run_mode(mode)
    q, k, v, seg = make_inputs(rng, b, t, hq, hkv, d, dtype, segments)
    out = sliding_window_attention(q, k, v, window=window, segment_ids=seg, interpret=interpret)
    assert out.shape == q.shape and out.dtype == dtype
    want = numpy_attention(
        q, k, v, window=window, segment_ids=None if seg is None else np.asarray(seg)
    )
    np.testing.assert_allclose(
        np.asarray(out, np.float64), want, atol=TOL[dtype][0], rtol=TOL[dtype][2]
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("b,t,hq,hkv,d,densities,segments,dtype", GLOBAL_CASES)
def test_conditional_global_values(mode, b, t, hq, hkv, d, densities, segments, dtype, rng):
    interpret = run_mode(mode)
    q, k, v, seg = make_inputs(rng, b, t, hq, hkv, d, dtype, segments)
    route = make_route(rng, densities, t)
    out = conditional_global_attention(q, k, v, route, segment_ids=seg, interpret=interpret)
    assert out.shape == q.shape and out.dtype == dtype
    assert not np.asarray(out)[~np.asarray(route)].any(), "skipped tokens must get exactly 0"
    want = numpy_attention(
        q, k, v, route=np.asarray(route), segment_ids=None if seg is None else np.asarray(seg)
    )
    np.testing.assert_allclose(
        np.asarray(out, np.float64), want, atol=TOL[dtype][0], rtol=TOL[dtype][2]
    )


def check_grads(op, reference, q, k, v, dtype, rng):
    do = jnp.asarray(rng.standard_normal(q.shape), dtype)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))

    got = jax.grad(loss(op), argnums=(0, 1, 2))(q, k, v)
    # the reference sees the same (possibly bf16-rounded) inputs, computed in float32
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = jax.grad(loss(reference), argnums=(0, 1, 2))(*f32)
    for name, g, w in zip("qkv", got, want, strict=True):
        assert g.dtype == dtype, name
        np.testing.assert_allclose(
            np.asarray(g, np.float32),
            np.asarray(w),
            rtol=TOL[dtype][2],
            atol=TOL[dtype][1],
            err_msg=f"d{name}",
        )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "b,t,hq,hkv,d,window,segments,dtype", [c for c in SWA_CASES if c[1] <= 333]
)
def test_sliding_window_grads(mode, b, t, hq, hkv, d, window, segments, dtype, rng):
    interpret = run_mode(mode)
    q, k, v, seg = make_inputs(rng, b, t, hq, hkv, d, dtype, segments)
    check_grads(
        lambda q, k, v: sliding_window_attention(
            q, k, v, window=window, segment_ids=seg, interpret=interpret
        ),
        lambda q, k, v: sliding_window_attention_reference(q, k, v, window=window, segment_ids=seg),
        q,
        k,
        v,
        dtype,
        rng,
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "b,t,hq,hkv,d,densities,segments,dtype", [c for c in GLOBAL_CASES if c[1] <= 333]
)
def test_conditional_global_grads(mode, b, t, hq, hkv, d, densities, segments, dtype, rng):
    interpret = run_mode(mode)
    q, k, v, seg = make_inputs(rng, b, t, hq, hkv, d, dtype, segments)
    route = make_route(rng, densities, t)
    check_grads(
        lambda q, k, v: conditional_global_attention(
            q, k, v, route, segment_ids=seg, interpret=interpret
        ),
        lambda q, k, v: conditional_global_attention_reference(q, k, v, route, segment_ids=seg),
        q,
        k,
        v,
        dtype,
        rng,
    )


ROWS_CASES = [
    # b, t, hq, hkv, d, routed count per row, compacted rows, segments, dtype
    (2, 200, 4, 1, 64, (30, 50), 50, True, jnp.float32),
    (2, 256, 2, 1, 64, (32, 0), 64, False, jnp.float32),
    (2, 129, 4, 2, 128, (129, 64), 129, False, jnp.float32),
    (1, 333, 8, 2, 64, (80,), 100, True, jnp.bfloat16),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("b,t,hq,hkv,d,counts,rows,segments,dtype", ROWS_CASES)
def test_routed_rows_values_and_grads(mode, b, t, hq, hkv, d, counts, rows, segments, dtype, rng):
    """Routed queries handed over as compacted rows (fewer than the tokens, not a multiple of
    any tile; one row of the batch with no routed token, one with all): values against float64
    NumPy at the routed tokens, exactly zero in padding rows, gradients against jax.grad of
    the jnp reference."""
    interpret = run_mode(mode)
    q, k, v, seg = make_inputs(rng, b, t, hq, hkv, d, dtype, segments)
    route = np.zeros((b, t), bool)
    for row, count in enumerate(counts):
        route[row, rng.choice(t, count, replace=False)] = True
    qpos, _ = compact_routed(jnp.asarray(route), rows)
    q_rows = jnp.take_along_axis(q, jnp.maximum(qpos, 0)[:, :, None, None], axis=1)
    out = routed_rows_attention(q_rows, k, v, qpos, segment_ids=seg, interpret=interpret)
    assert out.shape == q_rows.shape and out.dtype == dtype
    padding = np.asarray(qpos) < 0
    assert not np.asarray(out)[padding].any(), "padding rows must get exactly 0"
    full = numpy_attention(
        q, k, v, route=route, segment_ids=None if seg is None else np.asarray(seg)
    )
    want = np.take_along_axis(full, np.maximum(np.asarray(qpos), 0)[:, :, None, None], axis=1)
    want[padding] = 0
    np.testing.assert_allclose(
        np.asarray(out, np.float64), want, atol=TOL[dtype][0], rtol=TOL[dtype][2]
    )
    check_grads(
        lambda q, k, v: routed_rows_attention(q, k, v, qpos, segment_ids=seg, interpret=interpret),
        lambda q, k, v: routed_rows_attention_reference(q, k, v, qpos, segment_ids=seg),
        q_rows,
        k,
        v,
        dtype,
        rng,
    )


def test_routed_rows_shapes_are_checked(rng):
    q, k, v, _ = make_inputs(rng, 1, 64, 4, 2, 64, jnp.float32, False)
    qpos = jnp.arange(16, dtype=jnp.int32)[None]
    with pytest.raises(ValueError, match="qpos"):
        routed_rows_attention(q[:, :16], k, v, qpos[:, :8], interpret=True)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        routed_rows_attention(q[:, :16, :3], k, v, qpos, interpret=True)
    with pytest.raises(ValueError, match="head_dim"):
        routed_rows_attention(q[:, :16, :, :32], k, v, qpos, interpret=True)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_long_sequence_grads_with_gqa7(mode, rng):
    interpret = run_mode(mode)
    q, k, v, seg = make_inputs(rng, 1, 1000, 7, 1, 64, jnp.float32, True)
    route = make_route(rng, (0.2,), 1000)
    check_grads(
        lambda q, k, v: sliding_window_attention(
            q, k, v, window=300, segment_ids=seg, interpret=interpret
        ),
        lambda q, k, v: sliding_window_attention_reference(q, k, v, window=300, segment_ids=seg),
        q,
        k,
        v,
        jnp.float32,
        rng,
    )
    check_grads(
        lambda q, k, v: conditional_global_attention(q, k, v, route, interpret=interpret),
        lambda q, k, v: conditional_global_attention_reference(q, k, v, route),
        q,
        k,
        v,
        jnp.float32,
        rng,
    )


@pytest.mark.parametrize("mode", MODES)
def test_longest_sequence_sampled_rows(mode, rng):
    """Natively a length just under the 131072 limit (interpret mode: a short one), odd so the
    last tile is partial: outputs and gradients of both ops are finite everywhere, and sampled
    rows (the first and last included) match float64 NumPy."""
    interpret = run_mode(mode)
    t, window = (2049, 300) if interpret else (131071, 4096)
    q, k, v, _ = make_inputs(rng, 1, t, 2, 1, 64, jnp.bfloat16, False)
    route = make_route(rng, (0.2,), t)
    do = jnp.asarray(rng.standard_normal(q.shape), jnp.bfloat16)
    ops = {
        "window": lambda q, k, v: sliding_window_attention(
            q, k, v, window=window, interpret=interpret
        ),
        "global": lambda q, k, v: conditional_global_attention(q, k, v, route, interpret=interpret),
    }
    rows = np.unique(np.concatenate([[0, t - 1], rng.choice(t, 30, replace=False)]))
    f64 = [np.asarray(x, np.float64) for x in (q, k, v)]
    routed = np.asarray(route)[0]
    for name, op in ops.items():
        out, vjp = jax.vjp(op, q, k, v)
        for x, what in zip((out, *vjp(do)), ("out", "dq", "dk", "dv"), strict=True):
            assert np.isfinite(np.asarray(x, np.float32)).all(), f"{name} {what}"
        out = np.asarray(out, np.float64)
        assert_rows_match_numpy(out, f64, rows, routed, window if name == "window" else None)


@pytest.mark.gpu
def test_arrays_over_2_31_elements(rng):
    """Natively only (interpret mode cannot hold these sizes): q with more than 2**31 elements
    (T=131072, 140 query heads over 20 kv heads, D=128), so element offsets inside the kernels
    need 64 bits. The last GQA group, which holds the largest offsets, must give the same
    outputs and gradients as the op run on that group alone (an array 20x smaller), and its
    sampled rows must match float64 NumPy."""
    run_mode("native")
    t, hq, hkv, d, window = 131072, 140, 20, 128, 4096
    group = hq // hkv
    assert t * hq * d > 2**31
    keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), 4)
    q, do = (jax.random.normal(key, (1, t, hq, d), jnp.bfloat16) for key in keys[:2])
    k, v = (jax.random.normal(key, (1, t, hkv, d), jnp.bfloat16) for key in keys[2:])
    route = make_route(rng, (0.2,), t)
    ops = {
        "window": lambda q, k, v: sliding_window_attention(q, k, v, window=window),
        "global": lambda q, k, v: conditional_global_attention(q, k, v, route),
    }

    def last_group(x):
        return x[:, :, -(group if x.shape[2] == hq else 1) :]

    small = [last_group(x) for x in (q, k, v, do)]
    f64 = [np.asarray(x, np.float64) for x in small[:3]]
    rows = np.unique(np.concatenate([[0, t - 1], rng.choice(t, 6, replace=False)]))
    routed = np.asarray(route)[0]
    for name, op in ops.items():
        out, vjp = jax.vjp(jax.jit(op), q, k, v)
        big = [np.asarray(last_group(x), np.float32) for x in (out, *vjp(do))]
        del out, vjp
        out, vjp = jax.vjp(jax.jit(op), *small[:3])
        want = [np.asarray(x, np.float32) for x in (out, *vjp(small[3]))]
        for got, ref, what in zip(big, want, ("out", "dq", "dk", "dv"), strict=True):
            assert np.isfinite(got).all(), f"{name} {what}"
            np.testing.assert_allclose(got, ref, atol=1e-2, rtol=2.0**-7, err_msg=f"{name} {what}")
        assert_rows_match_numpy(big[0], f64, rows, routed, window if name == "window" else None)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("counts", [(32, 3), (33, 0), (128, 5), (129, 64)])
def test_routed_counts_at_tile_boundaries(mode, counts, rng):
    """Routed counts that fill 32-row query tiles exactly and that spill one row into the next
    tile; the tiles after the last routed row hold only padding and are skipped."""
    interpret = run_mode(mode)
    t = 256
    q, k, v, _ = make_inputs(rng, 2, t, 2, 1, 64, jnp.float32, False)
    route = np.zeros((2, t), bool)
    for row, count in enumerate(counts):
        route[row, rng.choice(t, count, replace=False)] = True
    route = jnp.asarray(route)
    blocks = AttentionBlocks(*[BlockConfig(32, 32, 4, 1)] * 3)
    check_grads(
        lambda q, k, v: conditional_global_attention(
            q, k, v, route, interpret=interpret, blocks=blocks
        ),
        lambda q, k, v: conditional_global_attention_reference(q, k, v, route),
        q,
        k,
        v,
        jnp.float32,
        rng,
    )
    out = conditional_global_attention(q, k, v, route, interpret=interpret, blocks=blocks)
    want = numpy_attention(q, k, v, route=np.asarray(route))
    np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_under_jit_with_other_tiles(mode, rng):
    """Tile sizes are configuration; rectangular tiles change every loop bound."""
    interpret = run_mode(mode)
    q, k, v, seg = make_inputs(rng, 2, 300, 4, 2, 64, jnp.float32, True)
    route = make_route(rng, (0.3, 0.6), 300)
    blocks = AttentionBlocks(
        forward=BlockConfig(64, 16, 4, 1),
        dq=BlockConfig(16, 32, 4, 1),
        dkdv=BlockConfig(32, 64, 4, 1),
    )
    swa = jax.jit(
        lambda q, k, v: sliding_window_attention(
            q, k, v, window=50, segment_ids=seg, interpret=interpret, blocks=blocks
        )
    )
    glob = jax.jit(
        lambda q, k, v: conditional_global_attention(
            q, k, v, route, segment_ids=seg, interpret=interpret, blocks=blocks
        )
    )
    np.testing.assert_allclose(
        swa(q, k, v),
        sliding_window_attention_reference(q, k, v, window=50, segment_ids=seg),
        atol=1e-5,
        rtol=0,
    )
    np.testing.assert_allclose(
        glob(q, k, v),
        conditional_global_attention_reference(q, k, v, route, segment_ids=seg),
        atol=1e-5,
        rtol=0,
    )
    check_grads(
        lambda q, k, v: glob(q, k, v),
        lambda q, k, v: conditional_global_attention_reference(q, k, v, route, segment_ids=seg),
        q,
        k,
        v,
        jnp.float32,
        rng,
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_tiles_for_every_head_dim_and_dtype(mode, d, dtype, rng):
    """The tiles ``default_blocks`` picks for the GPU (which differ by head_dim and dtype, to
    fit shared memory), in both modes: a length past every tile's padding, both ops, values and
    gradients."""
    interpret = run_mode(mode)
    t = 300
    q, k, v, seg = make_inputs(rng, 1, t, 2, 1, d, dtype, True)
    route = make_route(rng, (0.3,), t)
    blocks = default_blocks(4096, d, interpret=False, itemsize=jnp.dtype(dtype).itemsize)
    ops = {
        "window": (
            lambda q, k, v: sliding_window_attention(
                q, k, v, window=150, segment_ids=seg, interpret=interpret, blocks=blocks
            ),
            lambda q, k, v: sliding_window_attention_reference(
                q, k, v, window=150, segment_ids=seg
            ),
            dict(window=150),
        ),
        "global": (
            lambda q, k, v: conditional_global_attention(
                q, k, v, route, segment_ids=seg, interpret=interpret, blocks=blocks
            ),
            lambda q, k, v: conditional_global_attention_reference(q, k, v, route, segment_ids=seg),
            dict(route=np.asarray(route)),
        ),
    }
    for op, reference, semantics in ops.values():
        want = numpy_attention(q, k, v, segment_ids=np.asarray(seg), **semantics)
        np.testing.assert_allclose(
            np.asarray(op(q, k, v), np.float64), want, atol=TOL[dtype][0], rtol=TOL[dtype][2]
        )
        check_grads(op, reference, q, k, v, dtype, rng)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(d=48), "head_dim 48 is not supported"),
        (dict(window=0), "window must be an int >= 1"),
        (dict(hkv=3), "multiple of kv heads"),
        (dict(dtype=jnp.int32), "must be float32, bfloat16 or float16"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, match, rng):
    shape = dict(b=1, t=8, hq=4, hkv=2, d=64, window=4, dtype=jnp.float32) | kwargs
    q, k, v, _ = make_inputs(
        rng, shape["b"], shape["t"], shape["hq"], shape["hkv"], shape["d"], shape["dtype"], False
    )
    with pytest.raises(ValueError, match=match):
        sliding_window_attention(q, k, v, window=shape["window"], interpret=True)


def test_route_shape_is_checked(rng):
    q, k, v, _ = make_inputs(rng, 2, 8, 4, 2, 64, jnp.float32, False)
    with pytest.raises(ValueError, match="route must have shape"):
        conditional_global_attention(q, k, v, jnp.ones((2, 7), bool), interpret=True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "b, slots, hq, hkv, d, dtype, splits",
    [
        (3, 70, 7, 1, 16, jnp.float32, None),  # GQA 7:1, a cache not a multiple of the tile
        (2, 256, 4, 2, 64, jnp.bfloat16, None),
        (2, 512, 8, 8, 128, jnp.bfloat16, 3),  # MHA, chunks of uneven use
    ],
)
def test_decode_attention_values(mode, b, slots, hq, hkv, d, dtype, splits, rng):
    """One query per row against the first num_keys cache slots, rows not routed exactly 0
    (and their programs read nothing), against float64 NumPy."""
    from pallas_kernels import decode_attention

    interpret = run_mode(mode)
    q = jnp.asarray(rng.standard_normal((b, 1, hq, d)), dtype)
    k, v = (jnp.asarray(rng.standard_normal((b, slots, hkv, d)), dtype) for _ in range(2))
    num_keys = rng.integers(1, slots + 1, b)
    num_keys[0] = slots
    route = np.arange(b) % 2 == 0
    out = decode_attention(
        q, k, v, jnp.asarray(num_keys), route=jnp.asarray(route), splits=splits,
        interpret=interpret,
    )  # fmt: skip
    dense = decode_attention(q, k, v, jnp.asarray(num_keys), splits=splits, interpret=interpret)
    f64 = [np.asarray(x, np.float64) for x in (q, k, v)]
    atol, _, rtol = TOL[dtype]
    group = hq // hkv
    for bi in range(b):
        keys = np.arange(num_keys[bi])
        want = np.zeros((hq, d))
        for h in range(hq):
            s = f64[1][bi, keys, h // group] @ f64[0][bi, 0, h] / np.sqrt(d)
            p = np.exp(s - s.max())
            want[h] = (p / p.sum()) @ f64[2][bi, keys, h // group]
        np.testing.assert_allclose(np.asarray(dense[bi, 0], np.float64), want, atol=atol, rtol=rtol)
        if route[bi]:
            np.testing.assert_array_equal(out[bi], dense[bi])
        else:
            assert not np.asarray(out[bi]).any()
