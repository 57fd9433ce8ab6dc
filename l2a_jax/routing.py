"""L2A routing: configuration, routing modes, the sparsity regulariser and telemetry.

One L2A layer (``model.L2ADecoderLayer``)::

    h  = x + SWA(RMSNorm_in(x))                  # every token, window W
    s  = RMSNorm_global(h)
    z  = s . w_router;  sigma = sigmoid(z / tau)  # router, zero-initialised
    d  = 1[sigma >= threshold]                    # + sigma - stop_grad(sigma) when training
    x' = h + o_proj_global(d * GlobalAttn(s))    # only routed tokens get attention output
    y  = x' + MLP(RMSNorm_post(x'))

Routing modes are switches of the same forward code: ``l2a`` (learned), ``full`` (every token
global), ``swa`` (no token global), ``static`` (listed layers fully global, the rest SWA only),
``random`` (per-layer densities, tokens drawn at random each step).

Dense steps: on a fraction of training steps the global branch runs over every token and is
then masked by ``d``, so the straight-through estimator gives the router a gradient for
skipped tokens too (the sparse kernel returns 0 for them). The coin is a traced boolean and the
two branches are the two arms of one ``lax.cond``: one compiled program serves both kinds of
step, and only the chosen arm runs.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from l2a_jax.attention import ATTENTION_IMPLS
from l2a_jax.config import ConfigError

ROUTING_MODES = ("l2a", "full", "swa", "static", "random")
RAMPS = ("linear", "cosine")


@dataclasses.dataclass(frozen=True)
class L2AConfig:
    """Which layers become L2A and how they route.

    ``layers``: indices of L2A layers (None: every layer); the others keep full attention.
    ``window``: keys per token in the SWA branch, itself included (4095 for Qwen3-8B).
    ``tau``: router temperature; ``threshold``: route when sigmoid(z / tau) >= threshold.
    ``static_global_layers``: for ``static``, the L2A layers that are fully global.
    ``random_densities``: for ``random``, one routed fraction per L2A layer (e.g. measured on a
    learned run), in the order of ``layers``.
    ``dense_step_prob``: probability that a training step runs the global branch densely.
    ``attention_impl``: ``auto`` (Pallas kernels on GPU, jnp reference elsewhere), ``xla`` or
    ``pallas``.
    """

    layers: tuple[int, ...] | None = None
    window: int = 4095
    tau: float = 0.1
    threshold: float = 0.5
    mode: str = "l2a"
    static_global_layers: tuple[int, ...] = ()
    random_densities: tuple[float, ...] = ()
    dense_step_prob: float = 0.1
    attention_impl: str = "auto"

    def __post_init__(self):
        if self.mode not in ROUTING_MODES:
            raise ConfigError(f"l2a.mode {self.mode!r} is unknown; use one of {ROUTING_MODES}")
        if not isinstance(self.window, int) or self.window < 1:
            raise ConfigError(
                f"l2a.window must be an int >= 1 (keys per token), got {self.window!r}"
            )
        if not self.tau > 0:
            raise ConfigError(f"l2a.tau must be > 0, got {self.tau}")
        if not 0 < self.threshold < 1:
            raise ConfigError(f"l2a.threshold must be in (0, 1), got {self.threshold}")
        if not 0 <= self.dense_step_prob <= 1:
            raise ConfigError(f"l2a.dense_step_prob must be in [0, 1], got {self.dense_step_prob}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(
                f"l2a.attention_impl {self.attention_impl!r} is unknown; use one of "
                f"{ATTENTION_IMPLS}"
            )
        if self.mode == "static" and not self.static_global_layers:
            raise ConfigError(
                "l2a.mode 'static' needs l2a.static_global_layers: the layers that stay global"
            )
        if self.mode != "static" and self.static_global_layers:
            raise ConfigError("l2a.static_global_layers is only used with l2a.mode 'static'")
        if self.mode == "random":
            if not self.random_densities:
                raise ConfigError(
                    "l2a.mode 'random' needs l2a.random_densities: one routed fraction per L2A "
                    "layer (e.g. the layer{i}/routed_fraction metrics of a learned run)"
                )
            if any(not 0 <= p <= 1 for p in self.random_densities):
                raise ConfigError(
                    f"l2a.random_densities must lie in [0, 1]: {self.random_densities}"
                )
        elif self.random_densities:
            raise ConfigError("l2a.random_densities is only used with l2a.mode 'random'")

    def layer_indices(self, num_layers: int) -> tuple[int, ...]:
        """The L2A layers of a ``num_layers`` model, checked against every list in the config."""
        layers = tuple(range(num_layers)) if self.layers is None else tuple(self.layers)
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad or len(set(layers)) != len(layers):
            raise ConfigError(
                f"l2a.layers {layers} must be distinct indices in [0, {num_layers}); bad: {bad}"
            )
        stray = sorted(set(self.static_global_layers) - set(layers))
        if stray:
            raise ConfigError(f"l2a.static_global_layers {stray} are not L2A layers {layers}")
        if self.mode == "random" and len(self.random_densities) != len(layers):
            raise ConfigError(
                f"l2a.random_densities has {len(self.random_densities)} entries; it needs one "
                f"per L2A layer ({len(layers)})"
            )
        return layers

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> L2AConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown l2a config keys {unknown}; known: {sorted(known)}")
        d = dict(d)
        for key in ("layers", "static_global_layers", "random_densities"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class Routing:
    """What one forward pass does with the routers: ``train`` turns on the straight-through
    estimator; ``dense`` (a traced scalar bool) runs the global branch over every token; ``rng``
    draws the tokens of ``random`` mode."""

    train: bool = False
    dense: jax.Array | bool = False
    rng: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class LayerRouting:
    """How one L2A layer routes: ``learned`` (router), ``all`` / ``none`` (every / no token
    global), or ``random`` (tokens drawn with probability ``density``)."""

    kind: str
    density: float = 0.0


def layer_routing(cfg: L2AConfig, num_layers: int) -> dict[int, LayerRouting]:
    """The routing of every L2A layer of a ``num_layers`` model (other layers are absent)."""
    plan = {}
    for position, layer in enumerate(cfg.layer_indices(num_layers)):
        if cfg.mode == "l2a":
            plan[layer] = LayerRouting("learned")
        elif cfg.mode == "random":
            plan[layer] = LayerRouting("random", cfg.random_densities[position])
        elif cfg.mode == "full" or layer in cfg.static_global_layers:
            plan[layer] = LayerRouting("all")
        else:
            plan[layer] = LayerRouting("none")
    return plan


def sparsity_loss(stats: list[dict]) -> jax.Array:
    """The regulariser of L2A.md: per layer, the sum over a sequence's tokens of sigma^2,
    averaged over the batch and over the L2A layers."""
    if not stats:
        return jnp.zeros((), jnp.float32)
    return jnp.mean(jnp.stack([jnp.mean(s["sigma_sq_sum"]) for s in stats]))


def sparsity_weight(
    step, *, weight: float, warmup_steps: int, total_steps: int, ramp: str = "linear"
) -> jax.Array:
    """lambda(step): zero through warm-up, then rising (linearly or along a half cosine) to
    ``weight`` at ``total_steps``."""
    if ramp not in RAMPS:
        raise ConfigError(f"sparsity ramp {ramp!r} is unknown; use one of {RAMPS}")
    if total_steps <= warmup_steps:
        raise ConfigError(f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})")
    progress = jnp.clip(
        (jnp.asarray(step, jnp.float32) - warmup_steps) / (total_steps - warmup_steps), 0.0, 1.0
    )
    if ramp == "cosine":
        progress = 0.5 - 0.5 * jnp.cos(math.pi * progress)
    return weight * progress


def telemetry(stats: list[dict], layers: tuple[int, ...]) -> dict[str, jax.Array]:
    """Flat name -> scalar: per-layer routed fraction and router logit statistics, and the
    regulariser value (what the training loop and evals log)."""
    out = {"sparsity_loss": sparsity_loss(stats)}
    for index, s in zip(layers, stats, strict=True):
        for key, value in s.items():
            if key != "sigma_sq_sum":
                out[f"layer{index}/{key}"] = value
    if stats:
        out["routed_fraction"] = jnp.mean(jnp.stack([s["routed_fraction"] for s in stats]))
    return out
