"""Training pieces: which parameters train, the optimizer, the loss and one jitted step.

As released for L2A: attention (both branches), every norm and the routers train; MLPs,
embeddings and the LM head stay frozen. The loss is next-token cross-entropy plus
``lambda(step)`` times the sparsity regulariser. A step's dense-global coin and its random-route
key are drawn inside the step from its own key, so one compiled program serves every step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from l2a_jax.config import ConfigError
from l2a_jax.model import QwenModel
from l2a_jax.routing import RAMPS, Routing, sparsity_loss, sparsity_weight, telemetry

TRAINABLE = (
    "attn",
    "global_attn",
    "router",
    "input_norm",
    "post_norm",
    "global_norm",
    "final_norm",
)
TRAINABLE_PARAMS = nnx.All(nnx.Param, nnx.Any(*(nnx.PathContains(n) for n in TRAINABLE)))


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up then cosine decay, global-norm clipping, and the sparsity
    weight schedule (zero through ``sparsity_warmup_steps``, then ramped to
    ``sparsity_weight`` at ``total_steps``)."""

    learning_rate: float = 5e-5
    warmup_steps: int = 209
    total_steps: int = 3973
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    sparsity_weight: float = 1e-8
    sparsity_warmup_steps: int = 209
    sparsity_ramp: str = "linear"

    def __post_init__(self):
        if self.total_steps <= max(self.warmup_steps, self.sparsity_warmup_steps):
            raise ConfigError(
                f"total_steps ({self.total_steps}) must exceed warmup_steps "
                f"({self.warmup_steps}) and sparsity_warmup_steps ({self.sparsity_warmup_steps})"
            )
        if self.sparsity_ramp not in RAMPS:
            raise ConfigError(
                f"sparsity_ramp {self.sparsity_ramp!r} is unknown; use one of {RAMPS}"
            )
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")


class TrainState(NamedTuple):
    step: jax.Array
    params: nnx.State  # trainable parameters
    opt_state: Any
    rng: jax.Array


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, max(cfg.warmup_steps, 1), cfg.total_steps
    )
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(schedule, weight_decay=cfg.weight_decay),
    )


def next_token_loss(logits, input_ids, loss_mask=None) -> jax.Array:
    """Mean cross-entropy of predicting token t+1 from position t (float32 logits)."""
    targets = input_ids[:, 1:]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], targets)
    mask = jnp.ones_like(losses) if loss_mask is None else loss_mask[:, 1:].astype(losses.dtype)
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@dataclasses.dataclass(frozen=True)
class Trainer:
    """``state = trainer.init(seed)``, ``state, metrics = trainer.step(state, batch)`` (jitted;
    batch holds ``input_ids`` and optionally ``positions``, ``segment_ids``, ``loss_mask``, all
    (b, t)), ``trainer.model(state)`` for the trained model."""

    graphdef: nnx.GraphDef
    frozen: nnx.State
    initial: nnx.State
    optimizer: optax.GradientTransformation
    step: Any

    def init(self, seed: int = 0) -> TrainState:
        return TrainState(
            jnp.zeros((), jnp.int32),
            self.initial,
            self.optimizer.init(self.initial),
            jax.random.key(seed),
        )

    def model(self, state: TrainState) -> QwenModel:
        return nnx.merge(self.graphdef, state.params, self.frozen)


def make_trainer(
    model: QwenModel, cfg: OptimConfig, *, dense_step_prob: float | None = None
) -> Trainer:
    """``dense_step_prob`` defaults to the model's L2A config (0 for a base model)."""
    if dense_step_prob is None:
        dense_step_prob = model.l2a.dense_step_prob if model.l2a is not None else 0.0
    graphdef, params, frozen = nnx.split(model, TRAINABLE_PARAMS, ...)
    optimizer = make_optimizer(cfg)
    layers = model.l2a_layers

    def loss_fn(params, batch, routing, lam):
        logits, stats = nnx.merge(graphdef, params, frozen).forward_with_stats(
            batch["input_ids"], batch.get("positions"), batch.get("segment_ids"), routing=routing
        )
        ce = next_token_loss(logits, batch["input_ids"], batch.get("loss_mask"))
        return ce + lam * sparsity_loss(stats), (ce, stats)

    @jax.jit
    def step(state: TrainState, batch: dict):
        rng, coin_key, route_key = jax.random.split(state.rng, 3)
        dense = jax.random.bernoulli(coin_key, dense_step_prob)
        routing = Routing(train=True, dense=dense, rng=route_key)
        lam = sparsity_weight(
            state.step,
            weight=cfg.sparsity_weight,
            warmup_steps=cfg.sparsity_warmup_steps,
            total_steps=cfg.total_steps,
            ramp=cfg.sparsity_ramp,
        )
        (loss, (ce, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, batch, routing, lam
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        metrics = {
            "loss": loss,
            "cross_entropy": ce,
            "sparsity_weight": lam,
            "dense_step": dense,
            "grad_norm": optax.tree.norm(grads),
            **telemetry(stats, layers),
        }
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, opt_state, rng), metrics

    return Trainer(graphdef, frozen, params, optimizer, step)
