"""Rotary position embeddings with the scalings Qwen uses for long context.

The frequencies follow the HF ``rope_parameters`` conventions (default, linear, dynamic NTK, YaRN),
so a converted checkpoint sees exactly the angles it was trained with.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from l2a_jax.config import RopeConfig


def _base_exponents(head_dim: int) -> np.ndarray:
    return np.arange(0, head_dim, 2, dtype=np.float32) / head_dim


def _yarn(rope: RopeConfig, head_dim: int) -> tuple[np.ndarray, float]:
    base, factor = rope.theta, rope.factor
    pos_freqs = base ** _base_exponents(head_dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    original = rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0.0, 1.0)
    keep_extrapolated = 1.0 - ramp
    inv_freq = interpolation * (1.0 - keep_extrapolated) + extrapolation * keep_extrapolated

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rope.attention_factor is not None:
        attention_factor = rope.attention_factor
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
    else:
        attention_factor = mscale(factor)
    return inv_freq.astype(np.float32), float(attention_factor)


def rope_cos_sin(
    rope: RopeConfig,
    head_dim: int,
    max_position_embeddings: int,
    positions: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Float32 cos and sin tables (b, t, head_dim) for ``positions`` (b, t), already multiplied
    by the attention factor.

    ``dynamic`` NTK stretches the base once the longest position in the batch passes
    ``max_position_embeddings``; that length is read from ``positions`` at run time, so one
    compiled program serves every length.
    """
    attention_factor = 1.0
    if rope.rope_type == "dynamic":
        seq_len = jnp.maximum(jnp.max(positions) + 1, max_position_embeddings).astype(jnp.float32)
        stretch = rope.factor * seq_len / max_position_embeddings - (rope.factor - 1)
        base = rope.theta * stretch ** (head_dim / (head_dim - 2))
        inv_freq = 1.0 / base ** jnp.asarray(_base_exponents(head_dim))
    elif rope.rope_type == "yarn":
        inv_freq_np, attention_factor = _yarn(rope, head_dim)
        inv_freq = jnp.asarray(inv_freq_np)
    else:
        inv_freq = jnp.asarray((1.0 / rope.theta ** _base_exponents(head_dim)).astype(np.float32))
        if rope.rope_type == "linear":
            inv_freq = inv_freq / rope.factor
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x (b, t, h, d), cos/sin (b, t, d). Rotates channel pairs (i, i + d/2), the half-split
    layout of HF Qwen checkpoints."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin
