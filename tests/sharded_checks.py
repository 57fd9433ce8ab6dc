"""What the mesh tests share: the check that a sharded model's parameter gradients equal one
device's."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from l2a_jax import Routing


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
