"""The memory planner against what XLA compiles: the per-device estimate of a training step
within 15% of the compiled program's memory analysis on several meshes, remat policies and
trainable sets, on 8 simulated CPU devices; and its warning before a run that will not fit."""

import logging

import jax
import numpy as np
import pytest
from flax import nnx

from l2a_jax import L2AConfig, ModelConfig, QwenModel, convert_to_l2a
from l2a_jax.memory import (
    MemoryPlan,
    abstract_model,
    check_fits,
    compiled_bytes,
    compiled_step,
    plan_memory,
)
from l2a_jax.sharding import make_mesh
from l2a_jax.training import TrainConfig

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

CFG = ModelConfig(
    architecture="Qwen2ForCausalLM", vocab_size=2048, hidden_size=256, intermediate_size=768,
    num_layers=4, num_heads=8, num_kv_heads=2, head_dim=32, max_position_embeddings=1024,
    qkv_bias=True,
)  # fmt: skip
L2A = L2AConfig(window=64)


def compiled_step_bytes(mesh, *, batch_size, seq_len, remat, trainable, loss_chunk):
    model = convert_to_l2a(QwenModel(CFG, mesh=mesh, attention_impl="xla", rngs=nnx.Rngs(0)), L2A)
    cfg = TrainConfig(
        total_steps=10, warmup_steps=1, sparsity_warmup_steps=1, trainable=trainable,
        remat=remat, loss_chunk=loss_chunk,
    )  # fmt: skip
    return compiled_bytes(compiled_step(model, cfg, batch_size=batch_size, seq_len=seq_len))


CASES = {
    "data8_full": (dict(data=8), "full", "all"),
    "data2_fsdp2_tensor2_full": (dict(data=2, fsdp=2, tensor=2), "full", "all"),
    "fsdp8_none": (dict(fsdp=8), "none", "all"),
    "data2_seq4_full_recipe": (dict(data=2, seq=4), "full", "recipe"),
    "data8_dots": (dict(data=8), "dots", "all"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_plan_within_15_percent_of_compiled_memory(case):
    mesh_shape, remat, trainable = case
    mesh = make_mesh(**mesh_shape)
    settings = dict(batch_size=8, seq_len=512, remat=remat, trainable=trainable, loss_chunk=256)
    model = abstract_model(CFG, L2A, mesh=mesh, dtype=np.float32, attention_impl="xla")
    plan = plan_memory(model, mesh, **settings)
    real = compiled_step_bytes(mesh, **settings)
    assert abs(plan.total / real - 1) < 0.15, (plan, real)


def test_plan_parts_follow_the_mesh():
    """Weights and optimizer state divide by the fsdp and tensor axes; data copies them."""
    plans = {}
    for name, shape in {"data8": dict(data=8), "fsdp8": dict(fsdp=8)}.items():
        mesh = make_mesh(**shape)
        model = abstract_model(CFG, L2A, mesh=mesh, dtype=np.float32, attention_impl="xla")
        plans[name] = plan_memory(model, mesh, batch_size=8, seq_len=512, trainable="all")
    replicated, sharded = plans["data8"], plans["fsdp8"]
    n_params = sum(v.size for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert replicated.params == 4 * n_params  # float32 master weights, whole on each device
    assert replicated.optimizer == 2 * replicated.params
    assert 7.5 < replicated.params / sharded.params <= 8
    assert sharded.activations == replicated.activations  # one row per device either way


def test_check_fits_warns_with_the_largest_part(caplog):
    plan = MemoryPlan(
        params=1 << 30, optimizer=2 << 30, gradients=1 << 30, activations=20 << 30, loss=0
    )
    with caplog.at_level(logging.WARNING, logger="l2a_jax.memory"):
        assert check_fits(plan, capacity=80 << 30)
        assert not caplog.records
        assert not check_fits(plan, capacity=16 << 30)
    assert "largest part is activations" in caplog.text and "remat" in caplog.text
