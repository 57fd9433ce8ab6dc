"""Training objective pieces against float64 NumPy and the plain full-logits form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2a_jax import ConfigError
from l2a_jax.training import (
    TrainConfig,
    chunked_next_token_loss,
    next_token_loss,
    sparsity_weight,
)


def numpy_next_token_loss(hidden, head, ids, mask):
    logits = np.einsum("btd,dv->btv", hidden.astype(np.float64), head.astype(np.float64))
    logits = logits[:, :-1]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, ids[:, 1:, None], axis=-1)[..., 0]
    m = mask[:, 1:].astype(np.float64)
    return ((logz - picked) * m).sum() / max(m.sum(), 1.0)


@pytest.mark.parametrize("chunk", [1, 5, 36, 4096])
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_loss_matches_numpy_and_full_logits_gradients(chunk, masked, rng):
    hidden = rng.standard_normal((2, 37, 16)).astype(np.float32)
    head = rng.standard_normal((16, 50)).astype(np.float32)
    ids = rng.integers(0, 50, (2, 37))
    mask = rng.random((2, 37)) < 0.7 if masked else np.ones((2, 37), bool)
    loss_mask = jnp.asarray(mask) if masked else None

    def chunked(h, w):
        return chunked_next_token_loss(h, w, jnp.asarray(ids), loss_mask, chunk=chunk)

    def full(h, w):
        return next_token_loss(jnp.einsum("btd,dv->btv", h, w), jnp.asarray(ids), loss_mask)

    value, grads = jax.value_and_grad(chunked, argnums=(0, 1))(hidden, head)
    want = numpy_next_token_loss(hidden, head, ids, mask)
    np.testing.assert_allclose(float(value), want, rtol=1e-5)
    _, full_grads = jax.value_and_grad(full, argnums=(0, 1))(hidden, head)
    for got, ref in zip(grads, full_grads, strict=True):
        np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)


def test_sparsity_weight_schedule():
    kw = dict(weight=2.0, warmup_steps=10, total_steps=110)
    assert float(sparsity_weight(5, **kw)) == 0.0
    assert float(sparsity_weight(10, **kw)) == 0.0
    np.testing.assert_allclose(sparsity_weight(60, **kw), 1.0)
    np.testing.assert_allclose(sparsity_weight(110, **kw), 2.0)
    np.testing.assert_allclose(
        sparsity_weight(35, **kw, ramp="cosine"), 2.0 * (0.5 - 0.5 * np.cos(np.pi / 4))
    )
    with pytest.raises(ConfigError, match="ramp"):
        sparsity_weight(1, **kw, ramp="step")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(total_steps=100, warmup_steps=100), "total_steps .* must exceed"),
        (dict(sparsity_ramp="step"), "sparsity_ramp 'step' is unknown"),
        (dict(learning_rate=0.0), "learning_rate must be > 0"),
        (dict(dense_step_prob=1.5), r"dense_step_prob must be in \[0, 1\]"),
        (dict(loss_chunk=0), "loss_chunk must be >= 1"),
    ],
)
def test_invalid_train_configs(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**kwargs)
