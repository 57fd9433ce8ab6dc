"""One table from logical axis names to mesh axes; every weight's sharding derives from it.

Weights carry logical names in their ``axes`` metadata (see ``model.py``); activations use the
same names (``batch``, ``seq``). Kernels wrapped in ``shard_map`` derive their specs from the
same ``ShardingRules``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LOGICAL_AXES = (
    "batch", "seq", "vocab", "embed", "q_heads", "kv_heads", "head_dim", "mlp", "norm", "layers",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis name -> mesh axis name (or a tuple of them, or None for replicated)."""

    rules: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
        ("batch", ("data", "fsdp")),
        ("seq", "seq"),  # context parallelism (context_parallel.py)
        ("vocab", "tensor"),
        ("embed", "fsdp"),
        ("q_heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("mlp", "tensor"),
        ("norm", None),
        ("layers", None),  # a stack of per-layer arrays (the optimizer's state)
    )

    def __post_init__(self):
        unknown = sorted({name for name, _ in self.rules} - set(LOGICAL_AXES))
        if unknown:
            raise ValueError(f"unknown logical axes {unknown}; known: {LOGICAL_AXES}")

    @property
    def table(self) -> Mapping[str, str | tuple[str, ...] | None]:
        return dict(self.rules)

    def spec(
        self, axes: tuple[str, ...], mesh: Mesh, shape: tuple[int, ...] | None = None
    ) -> PartitionSpec:
        """PartitionSpec for logical ``axes``. Mesh axes absent from ``mesh`` or of size 1 are
        dropped, and so is any whose size does not divide the dimension (which then stays
        replicated along it)."""
        table = self.table
        used: set[str] = set()
        out = []
        for i, name in enumerate(axes):
            if name not in table:
                raise ValueError(
                    f"logical axis {name!r} has no sharding rule; known: {LOGICAL_AXES}"
                )
            target = table[name]
            targets = (target,) if isinstance(target, str) else tuple(target or ())
            kept = []
            for axis in targets:
                if axis not in mesh.shape or mesh.shape[axis] == 1 or axis in used:
                    continue
                size = int(np.prod([mesh.shape[a] for a in (*kept, axis)]))
                if shape is not None and shape[i] % size:
                    continue
                kept.append(axis)
            used.update(kept)
            out.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
        return PartitionSpec(*out)

    def sharding(self, axes: tuple[str, ...], mesh: Mesh, shape=None) -> NamedSharding:
        return NamedSharding(mesh, self.spec(axes, mesh, shape))


def axis_size(mesh: Mesh, axes) -> int:
    """Devices along one PartitionSpec entry: an axis name, a tuple of them, or None."""
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return int(np.prod([mesh.shape[a] for a in names]))


def batch_sharding(mesh: Mesh, rules: ShardingRules | None = None) -> NamedSharding:
    """Where a (batch, seq) input goes: rows split over the data axes, each row whole."""
    return (rules or ShardingRules()).sharding(("batch", "seq"), mesh)


def data_parallel_size(mesh: Mesh, rules: ShardingRules | None = None) -> int:
    """Devices a batch's rows are split over: the batch size must be a multiple of it."""
    return axis_size(mesh, batch_sharding(mesh, rules).spec[0])


MESH_AXES = ("data", "fsdp", "seq", "tensor")


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices=None, *, seq: int = 1) -> Mesh:
    """A ('data', 'fsdp', 'seq', 'tensor') mesh over ``devices`` (default: all): rows split
    over data and fsdp (weights over fsdp too), sequences over seq, heads over tensor."""
    devices = jax.devices() if devices is None else devices
    if data * fsdp * seq * tensor != len(devices):
        raise ValueError(
            f"mesh data*fsdp*seq*tensor = {data}*{fsdp}*{seq}*{tensor} must equal the device "
            f"count {len(devices)}"
        )
    return Mesh(np.asarray(devices).reshape(data, fsdp, seq, tensor), MESH_AXES)


def param_shardings(tree, mesh: Mesh, rules: ShardingRules | None = None):
    """NamedShardings matching ``tree`` (concrete or abstract): every ``nnx.Variable`` by its
    ``axes`` metadata, any other leaf (a step counter, an rng key) replicated. Works for
    parameter states and for optimizer states built from them, whose moments are Variables
    with the same metadata."""

    rules = rules or ShardingRules()
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(leaf):
        if isinstance(leaf, nnx.Variable):
            return rules.sharding(leaf.get_metadata()["axes"], mesh, tuple(leaf.shape))
        return replicated

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
