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
        (dict(remat="some"), "remat 'some' is unknown"),
        (dict(grad_accum_steps=0), "grad_accum_steps must be >= 1"),
        (dict(master_dtype="int8"), "master_dtype: dtype 'int8' is unknown"),
    ],
)
def test_invalid_train_configs(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**kwargs)


def _tiny_l2a():
    from flax import nnx

    from l2a_jax import L2AConfig, ModelConfig, QwenModel, convert_to_l2a

    cfg = ModelConfig("Qwen3ForCausalLM", 61, 32, 48, 2, 4, 2, 8, qk_norm=True)
    base = QwenModel(cfg, attention_impl="xla", rngs=nnx.Rngs(0))
    model = convert_to_l2a(base, L2AConfig(window=6))
    graphdef, state = nnx.split(model)
    flat = [
        (path, var.replace(jax.random.normal(jax.random.key(7), var.shape)))
        if path[-1] == "router" else (path, var)
        for path, var in nnx.to_flat_state(state)
    ]  # fmt: skip
    return nnx.merge(graphdef, nnx.from_flat_state(flat))  # routers that route about half


def _one_step(model, rng, **overrides):
    from l2a_jax import Batch
    from l2a_jax.training import init_state, train_step

    cfg = TrainConfig(
        learning_rate=1e-2, warmup_steps=1, total_steps=10, sparsity_weight=0.1,
        sparsity_warmup_steps=1, dense_step_prob=0.0, **overrides,
    )  # fmt: skip
    graphdef, state, frozen = init_state(model, cfg)
    batch = Batch.of(rng.integers(0, 61, (4, 20)))
    new_state, metrics = jax.jit(lambda s: train_step(graphdef, cfg, s, frozen, batch))(state)
    return new_state, metrics


def assert_same_step(tol, **overrides):
    """One step with ``overrides`` equals the plain step: loss, routed fraction and every
    updated parameter, within ``tol``."""
    model = _tiny_l2a()
    want_state, want = _one_step(model, np.random.default_rng(0))
    got_state, got = _one_step(model, np.random.default_rng(0), **overrides)
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=tol)
    np.testing.assert_allclose(got["routed_fraction"], want["routed_fraction"], rtol=1e-6)
    for g, w in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(want_state.params),
                    strict=True):  # fmt: skip
        np.testing.assert_allclose(g, w, atol=tol, rtol=0)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_changes_memory_not_results(remat):
    assert_same_step(1e-6, remat=remat)


def test_gradient_accumulation_equals_the_whole_batch():
    assert_same_step(1e-5, grad_accum_steps=2)


def test_float32_master_weights_with_bfloat16_compute(rng):
    from flax import nnx

    model = _tiny_l2a()
    graphdef, state = nnx.split(model)
    bf16 = nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(jnp.bfloat16), state))
    new_state, metrics = _one_step(
        bf16, np.random.default_rng(0), master_dtype="float32", compute_dtype="bfloat16"
    )
    assert {x.dtype for x in jax.tree.leaves(new_state.params)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(new_state.opt_state) if x.ndim} == {
        jnp.dtype(jnp.float32)
    }
    _, f32 = _one_step(model, np.random.default_rng(0))
    np.testing.assert_allclose(metrics["cross_entropy"], f32["cross_entropy"], rtol=2e-2)


@pytest.mark.parametrize("master_dtype", [None, "float32"])
def test_the_model_stays_usable_after_donating_steps(master_dtype, rng):
    """The state holds its own copies of the trainable weights, also when the master dtype is
    the model's own, so donating the state never consumes the model's arrays."""
    from l2a_jax import Batch
    from l2a_jax.training import init_state, jit_train_step

    model = _tiny_l2a()
    ids = rng.integers(0, 61, (2, 12))
    before = np.asarray(model(ids))
    cfg = TrainConfig(
        learning_rate=1e-2, warmup_steps=1, total_steps=10, sparsity_warmup_steps=1,
        master_dtype=master_dtype,
    )  # fmt: skip
    graphdef, state, frozen = init_state(model, cfg)
    step = jit_train_step(graphdef, cfg, state, frozen)
    for _ in range(2):
        state, _ = step(state, frozen, Batch.of(ids))
    np.testing.assert_array_equal(np.asarray(model(ids)), before)


def _count_eqns(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        total += 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += _count_eqns(sub)
    return total


@pytest.mark.parametrize("trainable", ["recipe", "all"])
def test_train_step_program_does_not_grow_with_depth(trainable, rng):
    """The whole train step (forward, backward, optimizer) traces to the same program for 2 and
    10 layers: layers, their gradients and their optimizer update stay stacked per group, so
    the compile time of a deep model is that of a shallow one. Trained weights come back per
    layer, as the model had them."""
    from flax import nnx

    from l2a_jax import Batch, L2AConfig, ModelConfig, QwenModel, convert_to_l2a
    from l2a_jax.training import init_state, train_step, trained_model

    def program(num_layers):
        cfg = ModelConfig("Qwen3ForCausalLM", 61, 32, 48, num_layers, 4, 2, 8, qk_norm=True)
        base = QwenModel(cfg, attention_impl="xla", rngs=nnx.Rngs(0))
        model = convert_to_l2a(base, L2AConfig(window=6, layers=(1, 2)))  # three groups
        train = TrainConfig(
            learning_rate=1e-2, warmup_steps=1, total_steps=10, sparsity_warmup_steps=1,
            trainable=trainable,
        )  # fmt: skip
        graph, state, frozen = init_state(model, train)
        batch = Batch.of(rng.integers(0, 61, (2, 12)))
        step = jax.make_jaxpr(lambda s, f, b: train_step(graph, train, s, f, b))
        return model, graph, state, frozen, _count_eqns(step(state, frozen, batch).jaxpr)

    *_, shallow = program(4)
    model, graph, state, frozen, deep = program(10)
    assert shallow == deep
    # the state's weights, back per layer, are the model's own
    back = nnx.to_flat_state(nnx.state(trained_model(graph, state, frozen)))
    want = nnx.to_flat_state(nnx.state(model))
    assert [p for p, _ in back] == [p for p, _ in want]
    for (path, got), (_, expected) in zip(back, want, strict=True):
        np.testing.assert_array_equal(got.get_value(), expected.get_value(), err_msg=str(path))
        assert got.get_metadata().get("axes") == expected.get_metadata().get("axes"), path
