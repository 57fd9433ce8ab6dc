"""A model's layers run with compile time independent of depth: consecutive layers of one
structure (base layers, or L2A layers of one routing mode) are stacked and run by one
``lax.scan``, so XLA compiles each structure's layer once instead of once per layer.

The stack is built from the per-layer weights on every call (one copy of the weights, at
memory speed), so parameters keep their per-layer names and shardings for checkpoints and HF
conversion. What differs between layers of a group beyond their weights (an L2A layer's index,
which seeds its random routes, and its random-routing density) travels as scanned arrays, and
so does each layer's slice of a per-group cache (generation's KV caches).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class LayerGroup:
    """Consecutive layers of one structure: their graph, their weights stacked along a new
    leading axis, and the per-layer index and random-routing density."""

    graph: nnx.GraphDef
    weights: nnx.State
    index: jax.Array
    density: jax.Array
    layers: tuple[int, ...]  # positions in the model's layer list

    def __len__(self) -> int:
        return len(self.layers)

    def first(self):
        """The group's first layer as a module (its static fields describe all of them)."""
        return nnx.merge(self.graph, jax.tree.map(lambda w: w[0], self.weights))


def _structure(item) -> tuple:
    _, layer = item
    return type(layer).__name__, getattr(layer, "mode", None)


def layer_groups(layers) -> list[LayerGroup]:
    """``layers`` split into runs of one structure, weights stacked."""
    groups = []
    for _, run in itertools.groupby(enumerate(layers), key=_structure):
        run = list(run)
        members = [layer for _, layer in run]
        groups.append(
            LayerGroup(
                graph=nnx.graphdef(members[0]),
                weights=jax.tree.map(lambda *ws: jnp.stack(ws), *map(nnx.state, members)),
                index=jnp.asarray([getattr(m, "index", 0) for m in members], jnp.int32),
                density=jnp.asarray([getattr(m, "density", 0.0) for m in members], jnp.float32),
                layers=tuple(i for i, _ in run),
            )
        )
    return groups


def run_layers(
    layers,
    x: jax.Array,
    call: Callable,
    *,
    remat_policy=None,
    remat: bool = False,
    caches: list | None = None,
    groups: list[LayerGroup] | None = None,
) -> tuple[jax.Array, list, list]:
    """``call(layer, x, index, density, cache) -> (x, stats or None, cache or None)`` over
    ``layers`` in order. ``caches``: one pytree per group (leading layer axis) or None.
    Returns the last ``x``, the stats of the groups that report them and every group's new
    cache (leading layer axis, or None), in layer order. With ``remat`` each layer's
    backward recomputes it, keeping what ``remat_policy`` saves. ``groups``: the
    ``layer_groups(layers)`` already stacked (a decode loop stacks them once, not per step)."""
    groups = groups if groups is not None else layer_groups(layers)
    caches = caches if caches is not None else [None] * len(groups)
    stats, new_caches = [], []
    for group, cache in zip(groups, caches, strict=True):

        def body(x, inputs, graph=group.graph):
            weights, index, density, cache = inputs
            x, out, cache = call(nnx.merge(graph, weights), x, index, density, cache)
            return x, (out, cache)

        if remat:
            body = jax.checkpoint(body, policy=remat_policy)
        inputs = (group.weights, group.index, group.density, cache)
        x, (out, cache) = jax.lax.scan(body, x, inputs)
        if out is not None:
            stats.append(out)
        new_caches.append(cache)
    return x, stats, new_caches
