"""l2a-jax: Qwen2.5/Qwen3 in JAX, extended to long context with L2A routing."""

from l2a_jax.batch import Batch
from l2a_jax.config import ConfigError, L2AConfig, ModelConfig, RopeConfig
from l2a_jax.convert import convert_to_l2a
from l2a_jax.generate import generate
from l2a_jax.hf import from_hf, to_hf
from l2a_jax.model import QwenModel, forward, forward_with_stats, split_model
from l2a_jax.routing import RouterStats, Routing
from l2a_jax.weights import CheckpointError

__all__ = [
    "Batch",
    "CheckpointError",
    "ConfigError",
    "L2AConfig",
    "ModelConfig",
    "QwenModel",
    "RopeConfig",
    "RouterStats",
    "Routing",
    "convert_to_l2a",
    "forward",
    "forward_with_stats",
    "from_hf",
    "generate",
    "split_model",
    "to_hf",
]
