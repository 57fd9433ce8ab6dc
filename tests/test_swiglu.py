"""The fused gated feed-forward half (``pallas_kernels.swiglu``): its lowering (which runs here
without a GPU), its shape checks, the model's hook that picks it, and on a Hopper GPU its
values against float64 NumPy and its gradients (the jnp form's, exactly)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2a_jax import attention
from pallas_kernels import swiglu as kernel


def numpy_swiglu(x, w_gate, w_up):
    x, g, u = (np.asarray(a, np.float64) for a in (x, w_gate, w_up))
    g, u = x @ g, x @ u
    return g / (1.0 + np.exp(-g)) * u


def inputs(rng, m, k, f, dtype=jnp.bfloat16):
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w_gate = jnp.asarray(rng.standard_normal((k, f)) / np.sqrt(k), dtype)
    w_up = jnp.asarray(rng.standard_normal((k, f)) / np.sqrt(k), dtype)
    return x, w_gate, w_up


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_lowers_for_cuda(dtype):
    """The whole kernel traces and lowers through Mosaic GPU for a CUDA target, GPU or not."""
    x = jax.ShapeDtypeStruct((512, 896), dtype)
    w = jax.ShapeDtypeStruct((896, 640), dtype)
    fn = jax.jit(functools.partial(kernel.swiglu_up, stages=3))
    text = fn.trace(x, w, w).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_shapes_are_checked():
    x = jnp.zeros((100, 64), jnp.bfloat16)
    w = jnp.zeros((64, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="m a multiple of 128"):
        kernel.swiglu_up(x, w, w)
    with pytest.raises(ValueError, match="w_up"):
        kernel.swiglu_up(jnp.zeros((128, 64), jnp.bfloat16), w, w[:, :64])


def test_takes_only_what_it_runs(monkeypatch):
    monkeypatch.setattr(kernel, "on_hopper", lambda: True)
    w = jnp.zeros((896, 4864), jnp.bfloat16)
    assert kernel.takes(jnp.zeros((256, 896), jnp.bfloat16), w)
    assert not kernel.takes(jnp.zeros((200, 896), jnp.bfloat16), w)  # rows
    assert not kernel.takes(jnp.zeros((256, 896), jnp.float32), w.astype(jnp.float32))
    assert not kernel.takes(jnp.zeros((256, 896), jnp.bfloat16), w[:, :100])  # columns
    monkeypatch.setattr(kernel, "on_hopper", lambda: False)
    assert not kernel.takes(jnp.zeros((256, 896), jnp.bfloat16), w)


def test_hook_gives_jnp_gradients(rng, monkeypatch):
    """The hook's custom VJP: its value is the kernel's (here stood in for by the float32
    reference, so it runs without a GPU) and its gradients are the jnp form's."""
    monkeypatch.setattr(kernel, "swiglu_up", kernel.swiglu_reference)
    x, w_gate, w_up = inputs(rng, 2 * 64, 64, 128, jnp.float32)
    x = x.reshape(2, 64, 64)
    fused = attention._swiglu_unless_differentiated
    want = numpy_swiglu(x.reshape(-1, 64), w_gate, w_up).reshape(2, 64, 128)
    np.testing.assert_allclose(np.asarray(fused(x, w_gate, w_up)), want, rtol=1e-5, atol=1e-5)
    w = jnp.asarray(rng.standard_normal((2, 64, 128)), jnp.float32)

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a) * w)

    got = jax.grad(loss(fused), argnums=(0, 1, 2))(x, w_gate, w_up)
    ref = jax.grad(loss(attention.swiglu), argnums=(0, 1, 2))(x, w_gate, w_up)
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(r))


def test_backend_picks_it_only_where_it_applies(monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "_swiglu_takes", lambda x, w: True)
    monkeypatch.setattr(attention, "_on_gpu", lambda: True)
    monkeypatch.setattr(
        attention, "_swiglu_unless_differentiated", lambda *a: calls.append(1) or "fused"
    )
    args = (jnp.zeros((1, 128, 64)), jnp.zeros((64, 128)), jnp.zeros((64, 128)))
    assert attention.AttentionBackend("auto", 64).swiglu(*args) == "fused"
    assert attention.AttentionBackend("xla", 64).swiglu(*args).shape == (1, 128, 128)
    assert len(calls) == 1


def on_hopper():
    if not kernel.on_hopper():
        pytest.skip("needs a Hopper GPU")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "m,k,f,dtype",
    [
        (128, 64, 128, jnp.bfloat16),  # one tile, one step
        (384, 896, 640, jnp.bfloat16),  # fewer tiles than SMs
        (2048, 896, 4864, jnp.bfloat16),  # Qwen2.5-0.5B's MLP, more tiles than SMs
        (1024, 256, 1024, jnp.float16),
    ],
)
def test_values_against_numpy(m, k, f, dtype, rng):
    on_hopper()
    x, w_gate, w_up = inputs(rng, m, k, f, dtype)
    out = np.asarray(jax.jit(kernel.swiglu_up)(x, w_gate, w_up), np.float64)
    np.testing.assert_allclose(out, numpy_swiglu(x, w_gate, w_up), atol=1e-2, rtol=2.0**-7)


@pytest.mark.gpu
def test_model_hook_runs_it_unless_differentiated(rng):
    """AttentionBackend('auto').swiglu on Hopper: evaluated, the Mosaic GPU kernel; under
    jax.grad, the jnp form's gradients exactly."""
    on_hopper()
    x, w_gate, w_up = inputs(rng, 2 * 256, 128, 256)
    x = x.reshape(2, 256, 128)
    hook = attention.AttentionBackend("auto", 64).swiglu
    assert "mosaic_gpu" in jax.jit(hook).lower(x, w_gate, w_up).as_text()
    want = numpy_swiglu(x.reshape(-1, 128), w_gate, w_up).reshape(2, 256, 256)
    np.testing.assert_allclose(
        np.asarray(hook(x, w_gate, w_up), np.float64), want, atol=1e-2, rtol=2.0**-7
    )
    w = jnp.asarray(rng.standard_normal((2, 256, 256)), jnp.float32)

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * w)

    got = jax.grad(loss(hook), argnums=(0, 1, 2))(x, w_gate, w_up)
    ref = jax.grad(loss(attention.swiglu), argnums=(0, 1, 2))(x, w_gate, w_up)
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(r))
