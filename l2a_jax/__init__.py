"""l2a-jax: Qwen2.5/Qwen3 in JAX, extended to long context with L2A routing."""

from l2a_jax.config import ConfigError, ModelConfig, RopeConfig
from l2a_jax.hf import from_hf, to_hf
from l2a_jax.l2a import convert_to_l2a
from l2a_jax.model import QwenModel, forward, forward_with_stats, split_model
from l2a_jax.routing import L2AConfig, Routing
from l2a_jax.weights import CheckpointError, load_model, save_model

__all__ = [
    "CheckpointError",
    "ConfigError",
    "L2AConfig",
    "ModelConfig",
    "QwenModel",
    "RopeConfig",
    "Routing",
    "convert_to_l2a",
    "forward",
    "forward_with_stats",
    "from_hf",
    "load_model",
    "save_model",
    "split_model",
    "to_hf",
]
