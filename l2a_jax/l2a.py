"""Turn a loaded base model into an L2A model."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from l2a_jax.model import QwenModel
from l2a_jax.routing import L2AConfig

# parameters of an L2A layer that are initialised from another parameter of the base layer
_FROM_BASE = {"global_attn": "attn", "global_norm": "input_norm"}


def _base_path(path: tuple) -> tuple:
    if len(path) > 2 and path[0] == "layers" and path[2] in _FROM_BASE:
        return (*path[:2], _FROM_BASE[path[2]], *path[3:])
    return path


def convert_to_l2a(model: QwenModel, l2a: L2AConfig) -> QwenModel:
    """An L2A model built from ``model`` (which is left unchanged).

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
    abstract = nnx.eval_shape(lambda: QwenModel(model.cfg, dtype=dtype, l2a=l2a, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    _, base_state = nnx.split(model)
    base = dict(nnx.to_flat_state(base_state))
    flat = []
    for path, var in nnx.to_flat_state(abstract_state):
        if path[2:] == ("router",):  # ("layers", i, "router"): only L2A layers have one
            value = jnp.zeros(var.shape, var.dtype)
        else:
            value = base[_base_path(path)][...]
        flat.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
