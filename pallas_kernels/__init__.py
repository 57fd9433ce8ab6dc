"""Attention kernels for L2A: Pallas (Triton lowering) with pure-jnp references."""

from pallas_kernels.attention import conditional_global_attention, sliding_window_attention
from pallas_kernels.blocks import AttentionBlocks, BlockConfig, default_blocks
from pallas_kernels.reference import (
    causal_attention_reference,
    conditional_global_attention_reference,
    sliding_window_attention_reference,
)

__all__ = [
    "AttentionBlocks",
    "BlockConfig",
    "causal_attention_reference",
    "conditional_global_attention",
    "conditional_global_attention_reference",
    "default_blocks",
    "sliding_window_attention",
    "sliding_window_attention_reference",
]
