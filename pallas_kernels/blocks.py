"""Tile sizes and launch parameters for the attention kernels, with shape heuristics."""

from __future__ import annotations

import dataclasses

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """One kernel launch: a query tile of ``block_q`` rows against key tiles of ``block_k``."""

    block_q: int
    block_k: int
    num_warps: int
    num_stages: int

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {size}")


@dataclasses.dataclass(frozen=True)
class AttentionBlocks:
    """Configs of the three kernels: forward, dQ, and dK/dV (which loops over query tiles)."""

    forward: BlockConfig
    dq: BlockConfig
    dkdv: BlockConfig

    @property
    def seq_multiple(self) -> int:
        """Sequences are padded to a multiple of every tile."""
        return max(
            c for cfg in (self.forward, self.dq, self.dkdv) for c in (cfg.block_q, cfg.block_k)
        )


def default_blocks(
    seq_len: int, head_dim: int, *, interpret: bool, windowed: bool = False
) -> AttentionBlocks:
    """Heuristics: Hopper-sized tiles on the GPU; small tiles in interpret mode so short test
    sequences still span several tiles and exercise every loop boundary. ``windowed``: the
    sliding-window op (short key loops) rather than the global one (long key loops)."""
    if interpret or seq_len <= 256:
        small = BlockConfig(block_q=32, block_k=32, num_warps=4, num_stages=1)
        return AttentionBlocks(small, small, small)
    if head_dim <= 64:
        return AttentionBlocks(
            forward=BlockConfig(128, 64, num_warps=4, num_stages=3),
            dq=BlockConfig(64, 64, num_warps=4, num_stages=2),
            dkdv=BlockConfig(64, 64, num_warps=4, num_stages=2),
        )
    # head_dim 128, measured with `bench/attention.py` on an H200 (28/4 heads): the window
    # forward is fastest with 64x64 tiles (T=8K: 1.07 vs 1.10 ms for 128x128; T=32K: 4.33 vs
    # 4.49 ms); the global forward, whose key loops run to the end of the sequence, with
    # 128x128 tiles, which load each key tile for twice the queries.
    forward = (
        BlockConfig(64, 64, num_warps=4, num_stages=3)
        if windowed
        else BlockConfig(128, 128, num_warps=8, num_stages=3)
    )
    return AttentionBlocks(
        forward=forward,
        dq=BlockConfig(64, 64, num_warps=4, num_stages=2),
        dkdv=BlockConfig(64, 64, num_warps=4, num_stages=2),
    )


def check_head_dim(head_dim: int) -> None:
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"head_dim {head_dim} is not supported by the Pallas kernels; supported: "
            f"{SUPPORTED_HEAD_DIMS} (use the 'xla' attention implementation otherwise)"
        )
