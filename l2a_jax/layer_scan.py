"""A model's layers run with compile time independent of depth: consecutive layers of one
structure (base layers, or L2A layers of one routing mode) are stacked and run by one
``lax.scan``, so XLA compiles each structure's layer once instead of once per layer.

The stack is built from the per-layer weights on every call (one copy of the weights, at
memory speed), so parameters keep their per-layer names and shardings for checkpoints and HF
conversion. What differs between layers of a group beyond their weights (an L2A layer's index,
which seeds its random routes, and its random-routing density) travels as scanned arrays.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx


def _structure(layer) -> tuple:
    return type(layer).__name__, getattr(layer, "mode", None)


def run_layers(
    layers, x: jax.Array, call: Callable, *, remat_policy=None, remat: bool = False
) -> tuple[jax.Array, list]:
    """``call(layer, x, index, density) -> (x, stats or None)`` over ``layers`` in order;
    returns the last ``x`` and the per-group stats (leading layer axis), in layer order.
    With ``remat`` each layer's backward recomputes it, keeping what ``remat_policy`` saves."""
    stats = []
    for _, group in itertools.groupby(layers, key=_structure):
        group = list(group)
        graph = nnx.graphdef(group[0])

        def body(x, inputs, graph=graph):
            weights, index, density = inputs
            return call(nnx.merge(graph, weights), x, index, density)

        if remat:
            body = jax.checkpoint(body, policy=remat_policy)
        weights = [nnx.state(layer) for layer in group]
        index = jnp.asarray([getattr(layer, "index", 0) for layer in group], jnp.int32)
        density = jnp.asarray([getattr(layer, "density", 0.0) for layer in group], jnp.float32)
        if len(group) == 1:
            x, out = body(x, (weights[0], index[0], density[0]))
            out = None if out is None else jax.tree.map(lambda a: a[None], out)
        else:
            stacked = jax.tree.map(lambda *ws: jnp.stack(ws), *weights)
            x, out = jax.lax.scan(body, x, (stacked, index, density))
        if out is not None:
            stats.append(out)
    return x, stats
