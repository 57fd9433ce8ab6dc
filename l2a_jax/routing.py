"""L2A routing: the per-token decision of one layer and what a layer reports about it.

One L2A layer (``model.L2ADecoderLayer``)::

    h  = x + SWA(RMSNorm_in(x))                  # every token, window W
    s  = RMSNorm_global(h)
    z  = s . w_router;  sigma = sigmoid(z / tau)  # router, zero-initialised
    d  = 1[sigma >= threshold]                    # + sigma - stop_grad(sigma) when training
    x' = h + o_proj_global(d * GlobalAttn(s))    # only routed tokens get attention output
    y  = x' + MLP(RMSNorm_post(x'))

A layer routes in one of the modes of ``config.ROUTING_MODES`` (``static`` resolved per layer):
``l2a`` (learned router), ``full`` (every token), ``swa`` (no token), ``random`` (tokens drawn
with the layer's density on every call).

Dense steps: on a fraction of training steps the global branch runs over every token and is
then masked by ``d``, so the straight-through estimator gives the router a gradient for
skipped tokens too (the sparse kernel returns 0 for them). The coin is a traced boolean and the
two branches are the two arms of one ``lax.cond``: one compiled program serves both kinds of
step, and only the chosen arm runs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Routing:
    """What one forward pass does with the routers: ``train`` turns on the straight-through
    estimator; ``dense`` (a bool, or a traced scalar bool) runs the global branch over every
    token; ``route_all`` (likewise) routes every token of learned layers whatever the router
    says, its gradient still flowing; ``route_prob`` (a float, or a traced scalar) routes each
    token of a learned layer with that probability on top of the router's choice (a hand-off
    from ``route_all`` to the routers; needs ``rng``); ``rng`` draws those tokens and the
    tokens of ``random`` layers;
    ``counted`` (b, t) bool, when given, limits the reported routed fraction to those tokens
    (the real tokens of right-padded prompts)."""

    train: bool = False
    dense: jax.Array | bool = False
    route_all: jax.Array | bool = False
    route_prob: jax.Array | float = 0.0
    rng: jax.Array | None = None
    counted: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RouterStats:
    """What L2A layers report about one forward pass; fields have a leading layer axis
    (one entry per L2A layer, in layer order) in what a model returns.

    ``routed_fraction``: fraction of tokens routed to global attention;
    ``sigma_sq_sum`` (.., batch): per sequence, the sum over tokens of sigma^2 (the sparsity
    regulariser's term; zero for layers without a learned router);
    ``logit_*``: mean, std, min and max of the router logits z.
    """

    routed_fraction: jax.Array
    sigma_sq_sum: jax.Array
    logit_mean: jax.Array
    logit_std: jax.Array
    logit_min: jax.Array
    logit_max: jax.Array

    @classmethod
    def of(
        cls, z: jax.Array, sigma: jax.Array, route: jax.Array, learned: bool, counted=None
    ) -> RouterStats:
        """Statistics of one layer from its logits z, sigma and hard route, all (b, t); the
        routed fraction over the ``counted`` tokens when given."""
        sigma_sq = jnp.sum(sigma * sigma, axis=1) if learned else jnp.zeros(z.shape[:1])
        routed = route.astype(jnp.float32)
        if counted is None:
            fraction = jnp.mean(routed)
        else:
            fraction = jnp.sum(routed * counted) / jnp.maximum(jnp.sum(counted), 1)
        return cls(
            routed_fraction=fraction,
            sigma_sq_sum=sigma_sq.astype(jnp.float32),
            logit_mean=jnp.mean(z),
            logit_std=jnp.std(z),
            logit_min=jnp.min(z),
            logit_max=jnp.max(z),
        )

    @classmethod
    def concat(cls, groups: list[RouterStats]) -> RouterStats | None:
        """One ``RouterStats`` from groups of layers (each with a leading layer axis), or None
        for a model without L2A layers."""
        if not groups:
            return None
        return jax.tree.map(lambda *xs: jnp.concatenate(xs), *groups)


def route_tokens(
    z: jax.Array,
    *,
    mode: str,
    density: float,
    tau: float,
    threshold: float,
    routing: Routing,
    layer_index: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """sigma (b, t), the hard route (bool) and the gate d (float32) of one layer from its
    router logits z (b, t) float32."""
    sigma = jax.nn.sigmoid(z / tau)
    if mode == "l2a":
        route = (sigma >= threshold) | routing.route_all
        off = isinstance(routing.route_prob, (int, float)) and routing.route_prob == 0
        if not off:
            if routing.rng is None:
                raise ValueError("Routing(route_prob=...) needs an rng key in Routing(rng=...)")
            # a key of its own, apart from the ones ``random`` layers draw from
            key = jax.random.fold_in(jax.random.fold_in(routing.rng, 1 << 20), layer_index)
            route = route | (jax.random.uniform(key, z.shape) < routing.route_prob)
    elif mode == "random":
        if routing.rng is None:
            raise ValueError("routing mode 'random' needs an rng key in Routing(rng=...)")
        draw = jax.random.uniform(jax.random.fold_in(routing.rng, layer_index), z.shape)
        route = draw < density
    else:
        route = jnp.full(z.shape, mode == "full")
    gate = route.astype(jnp.float32)
    if mode == "l2a" and routing.train:
        gate = gate + sigma - jax.lax.stop_gradient(sigma)  # straight-through estimator
    return sigma, route, gate
