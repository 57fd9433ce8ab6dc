"""Tiny random Hugging Face Qwen checkpoints built on the spot (nothing is downloaded)."""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

# name -> (architecture, config kwargs). Together they cover: Qwen2 biases, Qwen3 q/k norm,
# head_dim != hidden/heads, GQA 1:1, 2:1 and 7:1, tied and untied embeddings, every rope type,
# and Qwen3 with attention_bias (which adds an o_proj bias).
VARIANTS = {
    "qwen2_linear_gqa2": (
        "qwen2",
        dict(
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        ),
    ),
    "qwen2_dynamic_gqa7_tied": (
        "qwen2",
        dict(
            hidden_size=56,
            num_attention_heads=7,
            num_key_value_heads=1,
            tie_word_embeddings=True,
            max_position_embeddings=16,
            rope_parameters={"rope_type": "dynamic", "rope_theta": 5000.0, "factor": 3.0},
        ),
    ),
    "qwen3_yarn_headdim": (
        "qwen3",
        dict(
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
            max_position_embeddings=64,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 1e6,
                "factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    "qwen3_gqa7_tied_mha": (
        "qwen3",
        dict(
            hidden_size=56,
            num_attention_heads=7,
            num_key_value_heads=1,
            head_dim=16,
            tie_word_embeddings=True,
        ),
    ),
    "qwen3_bias_yarn_factor": (
        "qwen3",
        dict(
            hidden_size=48,
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=16,
            attention_bias=True,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 2.0,
                "original_max_position_embeddings": 32,
                "attention_factor": 1.3,
                "beta_fast": 16,
                "beta_slow": 2,
            },
        ),
    ),
}

_CLASSES = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}


def build_hf_model(variant: str, seed: int = 0, dtype=torch.float32):
    """A random HF model whose every weight (norms and biases included) is non-trivial."""
    family, kwargs = VARIANTS[variant]
    config_cls, model_cls = _CLASSES[family]
    config = config_cls(
        vocab_size=101,
        intermediate_size=80,
        num_hidden_layers=2,
        rms_norm_eps=1e-6,
        **{"max_position_embeddings": 128, **kwargs},
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model.to(dtype)


def save_hf_model(model, directory, **kwargs) -> str:
    model.save_pretrained(directory, **kwargs)
    return str(directory)
