"""A model's layers run with compile time independent of depth: consecutive layers of one
structure (base layers, or L2A layers of one routing mode) are stacked and run by one
``lax.scan``, so XLA compiles each structure's layer once instead of once per layer.

A model's own weights stay per layer (their names and shardings are those of HF conversion),
and ``layer_groups`` stacks them when it is called (one copy of the weights, at memory speed).
Training and serving keep them stacked instead (``StackedGraph``: the model's structure, with
its weights as ``{"model": ..., "layers": [one stacked state per group]}``): the train step
then neither stacks weights nor slices gradients apart, so its program does not grow with
depth, and a generation call does not walk the module graph.
What differs between layers of a group beyond their weights (an L2A layer's index, which seeds
its random routes, and its random-routing density) travels as scanned arrays, and so does each
layer's slice of a per-group cache (generation's KV caches).
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


@dataclasses.dataclass(frozen=True)
class GroupLayout:
    """A group's structure without its weights (hashable, so a jitted step can take it as a
    static argument): the layers' graph, their positions, indices and densities."""

    graph: nnx.GraphDef
    layers: tuple[int, ...]
    index: tuple[int, ...]
    density: tuple[float, ...]

    def group(self, weights: nnx.State) -> LayerGroup:
        """The group with ``weights`` stacked along a leading axis (as ``stack_states`` makes
        them, or with per-layer metadata as ``layer_groups`` does)."""
        weights = jax.tree.map(_per_layer_axes, weights, is_leaf=_is_variable)
        return LayerGroup(
            self.graph,
            weights,
            jnp.asarray(self.index, jnp.int32),
            jnp.asarray(self.density, jnp.float32),
            self.layers,
        )


def _structure(item) -> tuple:
    _, layer = item
    return type(layer).__name__, getattr(layer, "mode", None)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _per_layer_axes(x):
    """A stacked variable seen as one layer's inside the scan: ``layers`` off its axes."""
    if _is_variable(x) and x.get_metadata().get("axes", ())[:1] == ("layers",):
        return x.replace(axes=x.get_metadata()["axes"][1:])
    return x


def group_layouts(layers) -> tuple[GroupLayout, ...]:
    """``layers`` split into runs of one structure."""
    layouts = []
    for _, run in itertools.groupby(enumerate(layers), key=_structure):
        run = list(run)
        members = [layer for _, layer in run]
        layouts.append(
            GroupLayout(
                graph=nnx.graphdef(members[0]),
                layers=tuple(i for i, _ in run),
                index=tuple(int(getattr(m, "index", 0)) for m in members),
                density=tuple(float(getattr(m, "density", 0.0)) for m in members),
            )
        )
    return tuple(layouts)


def stack_states(states: list[nnx.State]) -> nnx.State:
    """Per-layer states of one structure stacked along a new leading axis; each variable's
    ``axes`` metadata gains a leading ``layers`` axis (replicated), so the stack is sharded as
    its layers were."""

    def stack(*vs):
        if not _is_variable(vs[0]):
            return jnp.stack(vs)
        axes = vs[0].get_metadata().get("axes")
        value = jnp.stack([v.get_value() for v in vs])
        return vs[0].replace(value, **({"axes": ("layers", *axes)} if axes else {}))

    return jax.tree.map(stack, *states, is_leaf=_is_variable)


@jax.jit
def _stack_groups(members: list[list[nnx.State]]) -> list[nnx.State]:
    """``stack_states`` of every group in one program (stacking leaf by leaf eagerly would
    dispatch an operation per weight)."""
    return [stack_states(states) for states in members]


def unstack_state(stacked: nnx.State, count: int) -> list[nnx.State]:
    """``stack_states`` undone: ``count`` per-layer states."""

    def one(n):
        def take(v):
            if not _is_variable(v):
                return v[n]
            axes = v.get_metadata().get("axes")
            return v.replace(v.get_value()[n], **({"axes": tuple(axes[1:])} if axes else {}))

        return jax.tree.map(take, stacked, is_leaf=_is_variable)

    return [one(n) for n in range(count)]


def layer_groups(layers) -> list[LayerGroup]:
    """``layers`` split into runs of one structure, weights stacked."""
    groups = []
    for layout in group_layouts(layers):
        groups.append(layout.group(stack_states([nnx.state(layers[i]) for i in layout.layers])))
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


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class StackedGraph:
    """A model's structure for running it from stacked weights: the whole model's graph, the
    graph of the model without its layers (``shell``: embeddings, final norm, head, attention
    backend) and each group of same-structure layers. Weights in this form are
    ``{"model": <a state of the shell>, "layers": [<a group's state, stacked>, ...]}``;
    a model's weights may come as several such trees (trainable and frozen, say), each holding
    its own part of every state.

    A static argument of jitted functions, equal to any graph of the same structure: the
    shell and the groups' layouts decide it (the whole model's graph follows from them, and
    comparing or hashing a deep model's graph on every call costs milliseconds); the hash is
    computed once."""

    model: nnx.GraphDef
    shell: nnx.GraphDef
    groups: tuple[GroupLayout, ...]

    def __eq__(self, other) -> bool:
        if not isinstance(other, StackedGraph):
            return NotImplemented
        return self is other or (self.shell, self.groups) == (other.shell, other.groups)

    def __hash__(self) -> int:
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash((self.shell, self.groups))
            object.__setattr__(self, "_hash", cached)
        return cached

    def split(self, state: nnx.State, *, stack: bool = True) -> dict:
        """A per-layer state of the model (or a part of it) in the stacked form. With
        ``stack=False`` each group holds the list of its layers' states instead, which
        ``layer_groups`` stacks where it runs (inside a jitted program: no separate copy)."""
        layers = state.get("layers", {})
        members = [
            [layers[i] if i in layers else nnx.State({}) for i in g.layers] for g in self.groups
        ]
        return {
            "model": nnx.State({k: v for k, v in state.items() if k != "layers"}),
            "layers": _stack_groups(members) if stack else members,
        }

    def join(self, stacked: dict) -> nnx.State:
        """``split`` undone: the per-layer state."""
        layers = {}
        for g, weights in zip(self.groups, stacked["layers"], strict=True):
            layers.update(zip(g.layers, unstack_state(weights, len(g.layers)), strict=True))
        return nnx.State({**stacked["model"], "layers": layers})

    def full_model(self, *trees: dict):
        """The whole model with per-layer weights again."""
        return nnx.merge(self.model, *(self.join(t) for t in trees))

    def shell_model(self, *trees: dict):
        """The model without its layers; ``layer_groups`` gives them, to pass to its
        ``hidden_with_stats`` or ``run_decoder``."""
        return nnx.merge(self.shell, *(t["model"] for t in trees))

    def layer_groups(self, *trees: dict) -> list[LayerGroup]:
        def stacked(states):  # a group's stack, or its layers' states (``stack=False``)
            return stack_states(states) if isinstance(states, list) else states

        return [
            g.group(nnx.merge_state(*map(stacked, states)))
            for g, *states in zip(self.groups, *(t["layers"] for t in trees), strict=True)
        ]


def stacked_graph(model, graphdef: nnx.GraphDef | None = None) -> StackedGraph:
    """The ``StackedGraph`` of ``model`` (a ``QwenModel``; ``graphdef``: its graph if already
    at hand); ``graph.split(nnx.state(model))`` gives its weights in the stacked form."""
    layers = model.layers
    model.layers = nnx.List([])  # the shell's graph: the model as it is, less its layers
    try:
        shell = nnx.graphdef(model)
    finally:
        model.layers = layers
    full = graphdef if graphdef is not None else nnx.graphdef(model)
    return StackedGraph(full, shell, group_layouts(layers))
