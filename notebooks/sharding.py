# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Sharding an L2A model: memory, layouts and collectives per mesh
#
# This notebook runs on a CPU with 8 simulated devices. It builds a Qwen2.5-0.5B-shaped L2A
# model **abstractly** (shapes only, nothing allocated), places it on several meshes of the
# four axes the library knows (`data`, `fsdp`, `seq`, `tensor`), and shows for each:
#
# 1. per-device memory of a training step (`l2a_jax.memory.plan_memory`, the planner
#    `train.py` uses to warn before a run that will not fit);
# 2. how arrays are laid out across devices;
# 3. which collectives XLA puts in the compiled training step.
#
# Change `SEQ_LEN`, `BATCH`, `REMAT` or the meshes below to plan your own run.

# %%
import os

# 8 simulated CPU devices; must be set before JAX starts
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import collections
import re

import jax
import jax.numpy as jnp
from flax import nnx

from l2a_jax import L2AConfig, ModelConfig, QwenModel, RopeConfig, convert_to_l2a
from l2a_jax.memory import abstract_model, compiled_bytes, compiled_step, plan_memory
from l2a_jax.sharding import ShardingRules, batch_sharding, make_mesh
from l2a_jax.training import TrainConfig

print(jax.devices())

# %% [markdown]
# ## The model: Qwen2.5-0.5B's shape, every layer L2A
# 24 layers, hidden 896, 14 query heads over 2 kv heads of 64, MLP 4864, vocabulary 151936.

# %%
QWEN25_0P5B = ModelConfig(
    architecture="Qwen2ForCausalLM",
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_layers=24,
    num_heads=14,
    num_kv_heads=2,
    head_dim=64,
    max_position_embeddings=131072,
    qkv_bias=True,
    rope=RopeConfig(theta=5e6),
)
L2A = L2AConfig(window=4096)
SEQ_LEN, BATCH, REMAT = 32768, 8, "dots"

MESHES = {
    "data=8": dict(data=8),
    "fsdp=8": dict(fsdp=8),
    "data=2 fsdp=2 tensor=2": dict(data=2, fsdp=2, tensor=2),
    "data=2 seq=4": dict(data=2, seq=4),
    "fsdp=2 seq=4": dict(fsdp=2, seq=4),
}

# %% [markdown]
# ## 1. Memory per device
# bf16 compute, float32 master weights and AdamW moments, the L2A recipe's trainable set
# (attention, norms, routers; MLP and embeddings frozen), the kernels' attention (as on a
# GPU: no score matrices kept). Sizes in GiB.

# %%
parts = ("params", "optimizer", "gradients", "activations", "loss", "total")
print(f"{'mesh':<24}" + "".join(f"{p:>12}" for p in parts))
plans = {}
for name, shape in MESHES.items():
    mesh = make_mesh(**shape)
    model = abstract_model(QWEN25_0P5B, L2A, mesh=mesh, attention_impl="pallas")
    plan = plan_memory(
        model, mesh, batch_size=BATCH, seq_len=SEQ_LEN, remat=REMAT, trainable="recipe"
    )
    plans[name] = plan
    values = [getattr(plan, p) for p in parts]
    print(f"{name:<24}" + "".join(f"{v / 2**30:>12.2f}" for v in values))

# %% [markdown]
# `data` copies the weights and optimizer state to every device; `fsdp` splits them (and the
# rows); `tensor` splits heads and MLP units; `seq` splits each sequence, so activations
# shrink with it while the global branch's all-gathered K/V (small with 2 kv heads) do not.
# The remat policy trades activations for recomputation:

# %%
mesh = make_mesh(fsdp=2, seq=4)
model = abstract_model(QWEN25_0P5B, L2A, mesh=mesh, attention_impl="pallas")
for remat in ("none", "dots", "full"):
    plan = plan_memory(model, mesh, batch_size=BATCH, seq_len=SEQ_LEN, remat=remat)
    print(
        f"remat={remat:<5} activations {plan.activations / 2**30:7.2f} GiB, "
        f"total {plan.total / 2**30:7.2f} GiB"
    )

# %% [markdown]
# ## 2. Layouts
# Each weight carries logical axis names; the one rule table maps them to mesh axes.

# %%
print(dict(ShardingRules().rules))

# %% [markdown]
# The query projection of one layer, (hidden, heads x head_dim), on `data=2 fsdp=2 tensor=2`:
# rows split over `fsdp`, columns over `tensor`, each block copied over `data`.

# %%
mesh = make_mesh(data=2, fsdp=2, tensor=2)
wq = ShardingRules().sharding(("embed", "q_heads"), mesh, (896, 14))
jax.debug.visualize_array_sharding(jax.device_put(jnp.zeros((896, 14)), wq))

# %% [markdown]
# A batch of token ids (batch, seq) on `data=2 seq=4`: rows over `data`, each row's tokens
# over `seq` (context parallelism). Drawn for 64 tokens per row; any length divisible by the
# 4 sequence shards is laid out the same way.

# %%
mesh = make_mesh(data=2, seq=4)
tokens = batch_sharding(mesh)
print(tokens.spec)
jax.debug.visualize_array_sharding(jax.device_put(jnp.zeros((BATCH, 64), jnp.int32), tokens))

# %% [markdown]
# ## 3. Collectives in the compiled training step
# A small model of the same family (compiling the full one on a CPU takes minutes) compiled
# for each mesh; the count of each collective in the optimized HLO of one training step.

# %%
SMALL = ModelConfig(
    architecture="Qwen2ForCausalLM", vocab_size=1024, hidden_size=128, intermediate_size=256,
    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=512,
    qkv_bias=True,
)  # fmt: skip
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
OP = re.compile(r"= \S+ (" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


def small_step(shape):
    mesh = make_mesh(**shape)
    model = convert_to_l2a(
        QwenModel(SMALL, mesh=mesh, attention_impl="xla", rngs=nnx.Rngs(0)), L2AConfig(window=32)
    )
    cfg = TrainConfig(total_steps=10, warmup_steps=1, sparsity_warmup_steps=1, remat="dots")
    return compiled_step(model, cfg, batch_size=8, seq_len=256)


compiled = {name: small_step(shape) for name, shape in MESHES.items()}
print(f"{'mesh':<24}" + "".join(f"{c:>20}" for c in COLLECTIVES))
for name in MESHES:
    hlo = compiled[name].as_text()
    ops = collections.Counter(OP.findall(hlo))
    print(f"{name:<24}" + "".join(f"{ops[c]:>20}" for c in COLLECTIVES))

# %% [markdown]
# How to read it: with `data` alone the only collectives are the gradients' all-reduces (XLA
# combines them into a few); `fsdp` adds all-gathers of the weights before they are used;
# `tensor` adds reductions after the projections whose inputs it splits; `seq` adds the
# collective-permutes that carry the window branch's halo from the previous shard and the
# all-gathers of K/V for the global branch (with reduce-scatters of their gradients).
#
# ## 4. Compiled memory against the plan
# The planner's estimate for the small model on each mesh, next to what XLA's compiled program
# reports (arguments + unaliased outputs + temporaries; CPU backend, jnp attention). At the
# sizes `tests/test_memory.py` checks the two agree within 10%; for a model this small, fixed
# costs the planner does not count in detail make the error larger.

# %%
print(f"{'mesh':<24}{'plan MiB':>12}{'compiled MiB':>14}{'ratio':>8}")
for name, shape in MESHES.items():
    mesh = make_mesh(**shape)
    model = abstract_model(SMALL, L2AConfig(window=32), mesh=mesh, dtype=jnp.float32,
                           attention_impl="xla")  # fmt: skip
    plan = plan_memory(model, mesh, batch_size=8, seq_len=256, remat="dots")
    real = compiled_bytes(compiled[name])
    print(f"{name:<24}{plan.total / 2**20:>12.1f}{real / 2**20:>14.1f}{plan.total / real:>8.2f}")
