"""The functional model form under jit with explicit shardings, on 4 virtual CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_models import build_hf_model, save_hf_model
from jax.sharding import NamedSharding, PartitionSpec

from l2a_jax import forward, from_hf, split_model
from l2a_jax.sharding import ShardingRules, make_mesh, param_shardings


def test_every_parameter_names_its_logical_axes(tmp_path):
    model = from_hf(save_hf_model(build_hf_model("qwen3_bias_yarn_factor"), tmp_path / "hf"))
    _, params = split_model(model)
    for path, var in nnx.to_flat_state(params):
        axes = var.get_metadata()["axes"]
        assert len(axes) == var.ndim, path


def test_sharded_load_and_jitted_forward_match_unsharded(tmp_path, rng):
    path = save_hf_model(build_hf_model("qwen2_linear_gqa2"), tmp_path / "hf")
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    rules = ShardingRules()
    sharded = from_hf(path, mesh=mesh, rules=rules, attention_impl="xla")
    graphdef, params = split_model(sharded)
    wq = params["layers"][0]["attn"]["wq"][...]
    assert wq.sharding.spec == PartitionSpec("fsdp", "tensor", None)
    assert len(wq.addressable_shards) == 8 and wq.addressable_shards[0].data.shape[:2] == (32, 2)

    ids = jnp.asarray(rng.integers(0, 101, (4, 24)))
    data_sharding = NamedSharding(mesh, rules.spec(("batch", "seq"), mesh))
    step = jax.jit(
        forward,
        static_argnums=0,
        in_shardings=(param_shardings(params, mesh, rules), data_sharding),
        out_shardings=rules.sharding(("batch", "seq", "vocab"), mesh, (4, 24, 101)),
    )
    got = step(graphdef, params, jax.device_put(ids, data_sharding))
    want = from_hf(path)(ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


def test_indivisible_dimension_stays_replicated():
    mesh = make_mesh(tensor=8)
    # 7 kv heads cannot split 8 ways
    assert ShardingRules().spec(
        ("embed", "kv_heads", "head_dim"), mesh, (56, 7, 8)
    ) == PartitionSpec(None, None, None)
    assert ShardingRules().spec(
        ("embed", "q_heads", "head_dim"), mesh, (56, 8, 8)
    ) == PartitionSpec(None, "tensor", None)


def test_bad_mesh_and_rules():
    with pytest.raises(ValueError, match="must equal the device count"):
        make_mesh(data=3)
    with pytest.raises(ValueError, match="unknown logical axes"):
        ShardingRules(rules=(("heads", "tensor"),))
