"""Attention kernels for L2A: Pallas (Triton lowering; Mosaic GPU forwards for Hopper) with
pure-jnp references, and for Hopper a fused feed-forward gate (``swiglu_up``).

Names are resolved on first use, so ``pallas_kernels.reference`` and ``pallas_kernels.blocks``
import without loading the Pallas Triton backend.
"""

import importlib

_EXPORTS = {
    "conditional_global_attention": "attention",
    "decode_attention": "decode",
    "routed_rows_attention": "attention",
    "sliding_window_attention": "attention",
    "swiglu_up": "swiglu",
    "AttentionBlocks": "blocks",
    "BlockConfig": "blocks",
    "default_blocks": "blocks",
    "causal_attention_reference": "reference",
    "conditional_global_attention_reference": "reference",
    "decode_attention_reference": "reference",
    "routed_rows_attention_reference": "reference",
    "sliding_window_attention_reference": "reference",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pallas_kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"pallas_kernels.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
