"""Training: the objective, the optimizer and one pure, sharded step."""

from l2a_jax.training.loss import (
    chunked_next_token_loss,
    next_token_loss,
    sparsity_loss,
    sparsity_weight,
)
from l2a_jax.training.step import (
    TRAINABLE_PARAMS,
    TrainConfig,
    TrainState,
    flat_metrics,
    init_state,
    jit_train_step,
    make_optimizer,
    train_step,
    trained_model,
)

__all__ = [
    "TRAINABLE_PARAMS",
    "TrainConfig",
    "TrainState",
    "chunked_next_token_loss",
    "flat_metrics",
    "init_state",
    "jit_train_step",
    "make_optimizer",
    "next_token_loss",
    "sparsity_loss",
    "sparsity_weight",
    "train_step",
    "trained_model",
]
