"""The model on 8 simulated CPU devices (data=2, fsdp=2, tensor=2): Pallas kernels (interpret
mode) under shard_map against the unsharded jnp reference, and the sharded training step
against one device."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_models import build_hf_model, save_hf_model
from jax.sharding import PartitionSpec
from sharded_checks import assert_param_grads_match, train_history

from l2a_jax import Batch, ConfigError, L2AConfig, convert_to_l2a, from_hf, split_model
from l2a_jax.convert import random_routers
from l2a_jax.sharding import make_mesh
from l2a_jax.training import TrainConfig, init_state, jit_train_step

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

SEQ = 37  # not a multiple of any tile: the kernels pad inside each shard


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # 4 query heads over 2 kv heads, head_dim 16: tensor=2 keeps each GQA group on one device
    return save_hf_model(build_hf_model("qwen2_linear_gqa2"), tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(data=2, fsdp=2, tensor=2)


def models(checkpoint, mesh, l2a):
    """(kernels on the mesh, reference on one device), same weights."""
    sharded = from_hf(checkpoint, mesh=mesh, attention_impl="pallas")
    single = from_hf(checkpoint, attention_impl="xla")
    if l2a is not None:
        sharded = random_routers(convert_to_l2a(sharded, l2a), seed=1)
        single = random_routers(convert_to_l2a(single, l2a), seed=1)
    return sharded, single


def primitives_inside(jaxpr, outer=()):
    """(primitive name, names of the primitives it sits inside) for every equation."""
    for eqn in jaxpr.eqns:
        yield eqn.primitive.name, outer
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from primitives_inside(sub, (*outer, eqn.primitive.name))


@pytest.mark.slow
@pytest.mark.parametrize("l2a", [None, L2AConfig(window=7)], ids=["base", "l2a"])
def test_kernels_on_mesh_match_unsharded_reference(checkpoint, mesh, l2a, rng):
    sharded, single = models(checkpoint, mesh, l2a)
    ids = jnp.asarray(rng.integers(0, 101, (4, SEQ)))
    segments = jnp.asarray(np.repeat([[1] * 20 + [2] * 17], 4, axis=0))

    graphdef, params = split_model(sharded)

    def logits_fn(params, ids, segments):
        return nnx.merge(graphdef, params)(ids, segment_ids=segments)

    jaxpr = jax.make_jaxpr(logits_fn)(params, ids, segments).jaxpr
    kernels = [outer for name, outer in primitives_inside(jaxpr) if name == "pallas_call"]
    assert kernels, "the forward runs no kernel"
    assert all("shard_map" in outer for outer in kernels), "a kernel runs outside shard_map"

    got = jax.jit(logits_fn)(params, ids, segments)
    want = single(ids, segment_ids=segments)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    if l2a is not None:
        _, stats = single.forward_with_stats(ids, segment_ids=segments)
        assert float(stats.routed_fraction.min()) > 0 and float(stats.routed_fraction.max()) < 1

    # parameter gradients, on a sparse step (and a dense one for L2A)
    dense_steps = (False, True) if l2a is not None else (False,)
    assert_param_grads_match(sharded, single, ids, segments, dense_steps)


def test_mesh_that_splits_a_gqa_group_is_refused(checkpoint):
    # tensor=4 splits the 4 query heads but not the 2 kv heads
    mesh = make_mesh(data=2, tensor=4)
    with pytest.raises(ConfigError, match=r"GQA group would span devices.*among \[1, 2\]"):
        from_hf(checkpoint, mesh=mesh, attention_impl="pallas")
    # the jnp reference has no such limit
    from_hf(checkpoint, mesh=mesh, attention_impl="xla")


@pytest.mark.slow
def test_sharded_train_steps_match_one_device(checkpoint, mesh, rng):
    cfg = TrainConfig(
        learning_rate=3e-3, warmup_steps=1, total_steps=20, sparsity_weight=0.05,
        sparsity_warmup_steps=1, dense_step_prob=0.5,
    )  # fmt: skip
    batch = Batch.of(rng.integers(0, 101, (4, 24)), vocab_size=101)
    histories = []
    for model_mesh in (mesh, None):
        model = convert_to_l2a(
            from_hf(checkpoint, mesh=model_mesh, attention_impl="xla"), L2AConfig(window=8)
        )
        history, step, state = train_history(model, cfg, batch)
        assert step._cache_size() == 1, "every step must reuse the first step's program"
        if model_mesh is not None:
            # the routers of every layer, stacked (replicated along the layer axis)
            router = state.params["layers"][0]["router"][...]
            assert router.sharding.spec == PartitionSpec(None, "fsdp")
        histories.append(history)
    sharded, single = histories
    assert any(h["dense_step"] for h in single) and not all(h["dense_step"] for h in single)
    for got, want in zip(sharded, single, strict=True):
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-5, err_msg=key)

    model = convert_to_l2a(from_hf(checkpoint, mesh=mesh, attention_impl="xla"), L2AConfig())
    graphdef, state, frozen = init_state(model, cfg)
    step = jit_train_step(graphdef, cfg, state, frozen)
    with pytest.raises(ValueError, match="batch size 2 does not split .* use a multiple of 4"):
        step(state, frozen, Batch.of(batch.input_ids[:2]))
