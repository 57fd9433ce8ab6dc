"""l2a-jax: Qwen2.5/Qwen3 in JAX, extended to long context with L2A routing."""

from l2a_jax.config import ConfigError, ModelConfig, RopeConfig
from l2a_jax.hf import CheckpointError, from_hf, to_hf
from l2a_jax.model import QwenModel, forward, split_model

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ModelConfig",
    "QwenModel",
    "RopeConfig",
    "forward",
    "from_hf",
    "split_model",
    "to_hf",
]
