"""How much memory a training step needs per device, before anything is allocated.

``plan_memory(model, mesh, batch_size=..., seq_len=..., remat=...)`` takes a model (concrete
or abstract: ``abstract_model`` builds one from shapes alone) and a mesh, and returns a
``MemoryPlan`` of bytes per device:

- **weights, optimizer state, gradients**: exact, from every weight's shape, dtype and its
  sharding under the one rule table (the same ``ShardingRules`` the step places them with).
  Trainable weights are kept in ``master_dtype``; AdamW keeps two moments of each; the step
  holds the gradients and, while clipping and updating, part of another copy.
- **activations**: a count of the tensors the backward pass keeps, per layer and per token,
  for the remat policy (``none`` keeps every intermediate, ``dots`` the matmul outputs,
  ``full`` each layer's input and recomputes the rest one layer at a time), on each device's
  part of the batch (split over data and fsdp), of the sequence (split over seq) and of the
  heads and MLP units (split over tensor). Attention adds the score matrices the jnp path
  (``xla``) materialises, (queries x keys) per head, or the kernels' per-row statistics. A
  context-parallel global branch computes its shard's rows against the whole sequence.
- **loss**: the float32 logits of one ``loss_chunk`` and their gradient.

The activation counts are the tensors XLA's buffer assignment keeps for this model's
layers, counted on the CPU backend's compiled train step (``tests/test_memory.py`` holds the
estimate to 15% of ``compiled.memory_analysis()`` on several meshes). ``check_fits`` warns
before a run whose plan exceeds the device's memory.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from l2a_jax.config import ConfigError
from l2a_jax.sharding import ShardingRules, axis_size

logger = logging.getLogger(__name__)

# Per layer and token, in units of the layer's widths: how many hidden-sized (h), attention
# projection-sized (a: q + k + v + o of one branch) and MLP-sized (m) vectors each policy keeps
# for the backward pass, and how many (queries x keys) score matrices per head and attention
# call the jnp attention keeps.
_SAVED = {"none": (8, 3, 4), "dots": (1, 1, 1.5), "full": (1, 0, 0)}
_SCORES_SAVED = {"none": 3.1, "dots": 0.0, "full": 0.0}
# one layer's forward and backward at a time: what it holds at its peak
_WORKING = (8, 3, 4)
_SCORES_WORKING = 4.75


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device, by part."""

    params: int  # trainable weights (master dtype) and frozen weights
    optimizer: int
    gradients: int
    activations: int
    loss: int

    @property
    def total(self) -> int:
        return self.params + self.optimizer + self.gradients + self.activations + self.loss

    def table(self) -> str:
        rows = [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)]
        rows.append(("total", self.total))
        return "\n".join(f"{name:<12}{value / 2**20:>12.1f} MiB" for name, value in rows)


def abstract_model(cfg, l2a=None, *, mesh: Mesh | None = None, dtype=jnp.bfloat16, **kwargs):
    """A ``QwenModel`` (L2A when ``l2a`` is given) of ``cfg``'s shape whose weights are
    ``jax.ShapeDtypeStruct``s: nothing is allocated, whatever the size."""
    from l2a_jax.convert import convert_to_l2a
    from l2a_jax.model import QwenModel

    def build():
        model = QwenModel(cfg, dtype=dtype, mesh=mesh, rngs=nnx.Rngs(0), **kwargs)
        return model if l2a is None else convert_to_l2a(model, l2a)

    return nnx.eval_shape(build)


def _shard_bytes(var: nnx.Variable, mesh: Mesh, rules: ShardingRules, dtype=None) -> int:
    spec = rules.spec(var.get_metadata()["axes"], mesh, tuple(var.shape))
    parts = math.prod(axis_size(mesh, entry) for entry in spec)
    itemsize = np.dtype(dtype or var.dtype).itemsize
    return math.prod(var.shape) * itemsize // parts


def _split(total: int, mesh: Mesh, rules: ShardingRules, logical: str) -> int:
    """``total`` divided by the devices the rule for ``logical`` splits it over (when it
    divides evenly, as ``ShardingRules.spec`` decides)."""
    return total // axis_size(mesh, rules.spec((logical,), mesh, (total,))[0])


def plan_memory(
    model,
    mesh: Mesh,
    *,
    batch_size: int,
    seq_len: int,
    remat: str = "none",
    trainable: str = "recipe",
    master_dtype: str | None = "float32",
    compute_dtype: str | None = None,
    loss_chunk: int = 4096,
) -> MemoryPlan:
    """Per-device bytes of one training step of ``model`` on ``mesh`` (see the module)."""
    from l2a_jax.model import REMAT_POLICIES
    from l2a_jax.training.step import TRAINABLE_SETS

    if remat not in REMAT_POLICIES:
        raise ConfigError(f"remat {remat!r} is unknown; use one of {tuple(REMAT_POLICIES)}")
    if trainable not in TRAINABLE_SETS:
        raise ConfigError(f"trainable {trainable!r} is unknown; use one of {tuple(TRAINABLE_SETS)}")
    rules = model.attention.rules
    train_state, rest = nnx.state(model, TRAINABLE_SETS[trainable], ...)
    trained = sum(
        _shard_bytes(v, mesh, rules, master_dtype) for _, v in nnx.to_flat_state(train_state)
    )
    frozen = sum(
        _shard_bytes(v, mesh, rules) for _, v in nnx.to_flat_state(rest) if isinstance(v, nnx.Param)
    )

    cfg = model.cfg
    # activations are in the compute dtype: the weights' own (as the model was built)
    compute = np.dtype(model.embed.dtype if compute_dtype is None else compute_dtype)
    compute = compute.itemsize
    rows = _split(batch_size, mesh, rules, "batch")
    seq_shards = axis_size(mesh, rules.spec(("seq",), mesh)[0])
    tokens = rows * (seq_len // seq_shards)
    heads = _split(cfg.num_heads, mesh, rules, "q_heads")
    kv_heads = _split(cfg.num_kv_heads, mesh, rules, "kv_heads")
    proj = (2 * heads + 2 * kv_heads) * cfg.head_dim
    mlp = _split(cfg.intermediate_size, mesh, rules, "mlp")

    l2a_layers = set(model.l2a_layers) if model.l2a is not None else set()
    window = model.l2a.window if model.l2a is not None else None
    kernels = model.attention.runs_as != "xla"

    def score_elems(global_branch: bool) -> int:
        """(queries x keys) per head of one attention call on this device."""
        t_local = seq_len // seq_shards
        if seq_shards == 1 and not global_branch and model.attention.banded(window, seq_len):
            return -(-seq_len // window) * window * 2 * window  # blocks reading 2 windows
        if seq_shards == 1:
            return seq_len * seq_len
        if global_branch:  # the shard's rows sit in a whole-sequence query array
            return seq_len * seq_len
        span = t_local + min(window - 1, seq_len - t_local)
        return span * span

    def layer_bytes(counts, scores_per_call, index) -> float:
        h, a, m = counts
        branches = 2 if index in l2a_layers else 1
        linear = tokens * (h * cfg.hidden_size + a * proj * branches + m * mlp) * compute
        if kernels:  # per-row softmax statistics instead of score matrices
            attn = tokens * heads * 4 * 2 * branches
        else:
            calls = [True] + ([False] if branches == 2 else [])
            attn = sum(scores_per_call * rows * heads * score_elems(g) * 4 for g in calls)
        return linear + attn

    layers = range(cfg.num_layers)
    saved = sum(layer_bytes(_SAVED[remat], _SCORES_SAVED[remat], i) for i in layers)
    working = max(layer_bytes(_WORKING, _SCORES_WORKING, i) for i in layers)
    chunk = min(loss_chunk, seq_len // seq_shards)
    loss = 3 * rows * chunk * _split(cfg.vocab_size, mesh, rules, "vocab") * 4
    return MemoryPlan(
        params=trained + frozen,
        optimizer=2 * trained,
        gradients=trained * 7 // 4,
        activations=int(saved + working),
        loss=loss,
    )


def compiled_step(model, cfg, *, batch_size: int, seq_len: int):
    """The training step (``jit_train_step``'s program for ``model`` on its mesh, with
    ``TrainConfig`` ``cfg``) compiled for (batch_size, seq_len) batches, not run: its
    ``memory_analysis()`` and ``as_text()`` show what the step needs and which collectives
    it runs."""
    from l2a_jax.batch import Batch
    from l2a_jax.training.step import init_state, jit_train_step

    graphdef, state, frozen = init_state(model, cfg, seed=0)
    step = jit_train_step(graphdef, cfg, state, frozen)
    batch = Batch.of(np.zeros((batch_size, seq_len), np.int32))
    return step.lower(state, frozen, batch).compile()


def compiled_bytes(compiled) -> int:
    """Per-device bytes a compiled program reports: arguments, outputs not aliased to them
    (donated buffers are reused), temporaries."""
    m = compiled.memory_analysis()
    return (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )


def device_memory(device=None) -> int | None:
    """Bytes the device can hold (None where the backend does not say, as on a CPU)."""
    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats()
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    return None if not stats else stats.get("bytes_limit")


def check_fits(plan: MemoryPlan, capacity: int | None = None, *, margin: float = 0.9) -> bool:
    """Logs a warning, naming the largest part and what shrinks it, when ``plan`` exceeds
    ``margin`` of ``capacity`` (default: the first device's memory); True when it fits or
    the capacity is unknown."""
    capacity = device_memory() if capacity is None else capacity
    if capacity is None or plan.total <= margin * capacity:
        return True
    parts = {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)}
    largest = max(parts, key=parts.get)
    advice = {
        "activations": "a remat policy ('dots' or 'full'), a sequence axis (mesh.seq) or "
        "fewer rows per device",
        "loss": "a smaller train.loss_chunk",
    }.get(largest, "more fsdp devices (mesh.fsdp) or fewer trainable weights")
    logger.warning(
        "the step needs about %.1f GiB per device, more than %.0f%% of the %.1f GiB there; "
        "the largest part is %s (%.1f GiB): try %s",
        plan.total / 2**30,
        margin * 100,
        capacity / 2**30,
        largest,
        parts[largest] / 2**30,
        advice,
    )
    return False
