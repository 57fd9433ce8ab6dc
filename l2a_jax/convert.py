"""Turn a loaded base model into an L2A model; prune the global branches of trained ones."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from l2a_jax.config import L2AConfig
from l2a_jax.model import QwenModel

# parameters of an L2A layer that are initialised from another parameter of the base layer
_FROM_BASE = {"global_attn": "attn", "global_norm": "input_norm"}


def _base_path(path: tuple) -> tuple:
    if len(path) > 2 and path[0] == "layers" and path[2] in _FROM_BASE:
        return (*path[:2], _FROM_BASE[path[2]], *path[3:])
    return path


def convert_to_l2a(
    model: QwenModel, l2a: L2AConfig, *, attention_impl: str | None = None
) -> QwenModel:
    """An L2A model built from ``model`` (which is left unchanged). It runs attention as
    ``model`` does (implementation, mesh and rules) unless ``attention_impl`` names another.

    In each L2A layer both the window branch and the global branch start from the base
    layer's attention weights (q/k/v/o, biases, q/k norms), ``RMSNorm_global`` starts from the
    base input norm (so the global branch first sees inputs scaled as the base attention did),
    and the router is zero: sigma = 0.5 for every token, so at step 0 every token is routed.
    Other parameters are shared with ``model`` as they are (arrays are immutable) and keep
    their shardings.
    """
    if model.l2a is not None:
        raise ValueError("the model is already an L2A model; convert its base model instead")
    dtype = model.embed[...].dtype
    backend = model.attention
    abstract = nnx.eval_shape(
        lambda: QwenModel(
            model.cfg,
            dtype=dtype,
            attention_impl=attention_impl or backend.impl,
            l2a=l2a,
            mesh=backend.mesh,
            rules=backend.rules,
            rngs=nnx.Rngs(0),
        )
    )
    graphdef, abstract_state = nnx.split(abstract)
    _, base_state = nnx.split(model)
    base = dict(nnx.to_flat_state(base_state))
    flat = []
    for path, var in nnx.to_flat_state(abstract_state):
        if path[2:] == ("router",):  # ("layers", i, "router"): only L2A layers have one
            value = jnp.zeros(var.shape, var.dtype)
            if backend.mesh is not None:
                axes = var.get_metadata()["axes"]
                value = jax.device_put(value, backend.rules.sharding(axes, backend.mesh))
        else:
            source = _base_path(path)
            value = base[source][...]
            if source != path:
                # a copy, not the base array itself: the two branches train apart, and a
                # training step that donates its state must not meet one buffer twice
                value = jnp.copy(value)  # keeps the sharding
        flat.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def prune_global_branches(model: QwenModel, layers) -> QwenModel:
    """``model`` with the global branch (global norm, router, global attention) of the L2A
    ``layers`` removed: those layers keep their window branch alone and no global KV cache.
    Exact for tokens the layer's router did not route (their global output is zero); a
    global output-projection bias, which every token receives, moves into the window
    branch's. ``model`` is left unchanged; the ``l2a`` config records the pruned layers."""
    if model.l2a is None:
        raise ValueError("only an L2A model has global branches to prune")
    layers = tuple(sorted(set(int(i) for i in layers)))
    bad = [i for i in layers if i not in model.l2a_layers]
    if bad:
        raise ValueError(f"layers {bad} are not L2A layers of this model ({model.l2a_layers})")
    pruned = tuple(sorted(set(model.l2a.pruned_layers) | set(layers)))
    l2a = dataclasses.replace(model.l2a, pruned_layers=pruned)
    dtype = model.embed[...].dtype
    backend = model.attention
    abstract = nnx.eval_shape(
        lambda: QwenModel(
            model.cfg, dtype=dtype, attention_impl=backend.impl, l2a=l2a, mesh=backend.mesh,
            rules=backend.rules, rngs=nnx.Rngs(0),
        )
    )  # fmt: skip
    graphdef, abstract_state = nnx.split(abstract)
    old = dict(nnx.to_flat_state(nnx.split(model)[1]))
    flat = []
    for path, var in nnx.to_flat_state(abstract_state):
        value = old[path][...]
        if path[0] == "layers" and path[1] in layers and path[2:] == ("attn", "bo"):
            value = value + old[("layers", path[1], "global_attn", "bo")][...]
        flat.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def random_routers(model: QwenModel, seed: int, scale: float = 1.0) -> QwenModel:
    """``model`` with every L2A router's weights drawn from N(0, scale^2), each placed as the
    router it replaces: routers that route some tokens and skip others, for benchmarks and
    tests of an untrained L2A model (about half the tokens route at scale 1)."""
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    count = sum(path[-1] == "router" for path, _ in flat)
    keys = iter(jax.random.split(jax.random.key(seed), max(count, 1)))
    out = []
    for path, var in flat:
        if path[-1] == "router":
            noise = scale * jax.random.normal(next(keys), var.shape, var.dtype)
            var = var.replace(jax.device_put(noise, var[...].sharding))
        out.append((path, var))
    return nnx.merge(graphdef, nnx.from_flat_state(out))
