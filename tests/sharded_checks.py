"""What the mesh tests share: the check that a sharded model's parameter gradients equal one
device's, and a few training steps' metrics."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from l2a_jax import Routing
from l2a_jax.training import flat_metrics, init_state, jit_train_step


def assert_param_grads_match(sharded, single, ids, segments, dense_steps, atol=1e-4):
    """Gradients of a log-probability loss for every parameter, on training steps with each
    ``dense`` value of ``dense_steps``."""
    for dense in dense_steps:

        def loss(model, dense=dense):
            logits = model(ids, segment_ids=segments, routing=Routing(train=True, dense=dense))
            return jnp.mean(jax.nn.log_softmax(logits)[..., 3])

        want_grads = nnx.to_flat_state(nnx.grad(loss)(single))
        got_grads = nnx.to_flat_state(nnx.grad(loss)(sharded))
        for (path, w), (_, g) in zip(want_grads, got_grads, strict=True):
            np.testing.assert_allclose(g[...], w[...], atol=atol, rtol=0, err_msg=str(path))


def train_history(model, cfg, batch, steps=4):
    """``steps`` training steps of ``model`` on ``batch``: each step's flat metrics, the jitted
    step and the final state."""
    graphdef, state, frozen = init_state(model, cfg, seed=3)
    step = jit_train_step(graphdef, cfg, state, frozen)
    history = []
    for _ in range(steps):
        state, metrics = step(state, frozen, batch)
        history.append(flat_metrics(metrics, model.l2a_layers))
    return history, step, state
