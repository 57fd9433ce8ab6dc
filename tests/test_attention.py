"""The attention interface's choice per call: which implementation runs where, and cuDNN
against the jnp reference on a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2a_jax import ConfigError
from l2a_jax.attention import AttentionBackend, _cudnn_takes, banded_window
from pallas_kernels import reference

ON_GPU = jax.default_backend() == "gpu"


@pytest.mark.parametrize(
    "dtype, head_dim, segments, takes",
    [
        (jnp.bfloat16, 128, False, True),
        (jnp.float16, 64, False, True),
        (jnp.bfloat16, 128, True, False),  # packed documents: no segment ids in cuDNN's API
        (jnp.float32, 128, False, False),
        (jnp.bfloat16, 256, False, False),
    ],
)
def test_cudnn_is_chosen_only_where_it_applies(dtype, head_dim, segments, takes):
    q = jax.ShapeDtypeStruct((1, 64, 4, head_dim), dtype)
    assert _cudnn_takes(q, jnp.zeros((1, 64)) if segments else None) == takes


@pytest.mark.skipif(ON_GPU, reason="what the CPU runs")
def test_off_the_gpu_auto_is_the_reference_and_cudnn_is_refused():
    assert AttentionBackend("auto", 128).describe() == "xla"
    with pytest.raises(ConfigError, match="'cudnn' needs a GPU; use 'auto' or 'xla'"):
        AttentionBackend("cudnn", 128)


def _qkv(rng, dtype, t=512, hq=8, hkv=2, d=128):
    def make(h):
        return jnp.asarray(rng.standard_normal((2, t, h, d)), dtype)

    return make(hq), make(hkv), make(hkv)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="cuDNN needs a GPU")
@pytest.mark.parametrize("impl", ["auto", "cudnn"])
def test_cudnn_matches_the_reference_natively(impl, rng):
    q, k, v = _qkv(rng, jnp.bfloat16)
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    backend = AttentionBackend(impl, 128)
    for window in (None, 100):
        want = reference.causal_attention_reference(q32, k32, v32, window=window)
        got = backend.causal(q, k, v, window=window)
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2e-2, rtol=0)
    route = jnp.asarray(rng.random((2, 512)) < 0.3)
    want = reference.conditional_global_attention_reference(q32, k32, v32, route)
    got = backend.routed(q, k, v, route)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2e-2, rtol=0)
    segments = jnp.asarray(np.repeat([[1] * 300 + [2] * 212], 2, axis=0))
    if impl == "cudnn":
        with pytest.raises(ValueError, match="takes no segment_ids"):
            backend.causal(q, k, v, segment_ids=segments)
    else:  # packed documents run on the Pallas kernel
        want = reference.causal_attention_reference(q32, k32, v32, segment_ids=segments)
        got = backend.causal(q, k, v, segment_ids=segments)
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2e-2, rtol=0)


@pytest.mark.parametrize(
    "t, hq, hkv, window, segments",
    [(64, 4, 2, 16, False), (70, 4, 1, 16, True), (100, 2, 2, 7, True), (512, 4, 2, 16, True)],
)
def test_banded_window_equals_the_reference_and_its_gradients(t, hq, hkv, window, segments, rng):
    """The jnp path's band-by-band window (sequences not a multiple of the window, GQA,
    packed documents) against the reference's full masked score matrix; both keep float32
    softmax statistics, so they agree to float32 rounding."""
    q, k, v = (jnp.asarray(rng.normal(size=(2, t, h, 8)), jnp.float32) for h in (hq, hkv, hkv))
    seg = jnp.asarray(np.sort(rng.integers(0, 4, (2, t)), axis=1)) if segments else None
    cotangent = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

    def banded(q, k, v):
        return banded_window(q, k, v, window, segment_ids=seg)

    def full(q, k, v):
        return reference.causal_attention_reference(q, k, v, window=window, segment_ids=seg)

    (got, got_vjp), (want, want_vjp) = (jax.vjp(f, q, k, v) for f in (banded, full))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_vjp(cotangent), want_vjp(cotangent), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(ON_GPU, reason="what the CPU runs")
def test_auto_off_the_gpu_takes_the_band_only_for_short_windows(rng):
    q = jnp.asarray(rng.normal(size=(1, 64, 2, 8)), jnp.float32)

    def lowered(impl, window):
        backend = AttentionBackend(impl, 8)
        return jax.jit(lambda q: backend.causal(q, q, q, window=window)).lower(q).as_text()

    assert "4x16x32" in lowered("auto", 16) and "64x64" not in lowered("auto", 16)
    assert "64x64" in lowered("auto", 17)  # over a quarter of the sequence: the full matrix
    assert "64x64" in lowered("xla", 16)  # ``xla`` is the reference itself
