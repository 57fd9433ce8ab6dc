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
    seq_len: int, head_dim: int, *, interpret: bool, itemsize: int = 2, routed: bool = False
) -> AttentionBlocks:
    """Heuristics: Hopper-sized tiles on the GPU; small tiles in interpret mode so short test
    sequences still span several tiles and exercise every loop boundary. ``itemsize``: bytes
    per element of q, k, v. Every GPU choice stays within the 227 KiB of shared memory a
    Hopper block may use: the software pipeline keeps ``num_stages`` copies of the streamed
    tiles (keys and values, or queries and output gradients for dK/dV), so wide rows (float32,
    head_dim 256) take smaller tiles and fewer stages. ``routed``: the tiles of conditional
    global attention rather than of the sliding window."""
    if interpret or seq_len <= 256:
        small = BlockConfig(block_q=32, block_k=32, num_warps=4, num_stages=1)
        return AttentionBlocks(small, small, small)
    row_bytes = head_dim * itemsize
    if head_dim <= 64:
        # dK/dV with 3 stages, measured on an H200 (14/2 heads of 64, 20% routed, global
        # forward + backward per layer, two rounds of 9): 4.44 against 4.65 ms at T=32K,
        # 63.1 against 67.0 ms at T=128K; the other tiles won `bench/attention.py --tune` there
        # The routed (global) forward runs 8 warps: 1.03 against 1.15 ms at T=32K and 15.2
        # against 16.1 ms at T=128K (one H200, 14/2 heads, 20% routed, forward only; 256x64,
        # 128x32 and 64x64 tiles were slower, 4 stages tied with 3).
        return AttentionBlocks(
            forward=BlockConfig(128, 64, num_warps=8 if routed else 4, num_stages=3),
            dq=BlockConfig(64, 64, num_warps=4, num_stages=2),
            dkdv=BlockConfig(64, 64, num_warps=4, num_stages=3),
        )
    if row_bytes <= 256:
        # head_dim 128 in 16 bits, measured with `bench/attention.py --tune` on an H200 (28/4
        # heads): both forwards are fastest with 128x128 tiles and 8 warps (window at T=32K:
        # 4.06-4.10 ms against 4.57 for 64x64; global 20%: 3.76-3.80 against 3.92 for 128x64);
        # with 64-row tiles each key tile is loaded for half as many queries. The backward
        # kernels keep 64x64: 128x128 is no faster for dQ and much slower for dK/dV.
        return AttentionBlocks(
            forward=BlockConfig(128, 128, num_warps=8, num_stages=3),
            dq=BlockConfig(64, 64, num_warps=4, num_stages=2),
            dkdv=BlockConfig(64, 64, num_warps=4, num_stages=2),
        )
    if row_bytes <= 512:  # head_dim 128 in float32, or 256 in 16 bits
        return AttentionBlocks(
            forward=BlockConfig(64, 64, num_warps=4, num_stages=2),
            dq=BlockConfig(64, 32, num_warps=4, num_stages=2),
            dkdv=BlockConfig(32, 64, num_warps=4, num_stages=2),
        )
    tile = BlockConfig(32, 32, num_warps=4, num_stages=1)  # head_dim 256 in float32
    return AttentionBlocks(BlockConfig(32, 32, num_warps=4, num_stages=2), tile, tile)


def check_head_dim(head_dim: int) -> None:
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"head_dim {head_dim} is not supported by the Pallas kernels; supported: "
            f"{SUPPORTED_HEAD_DIMS} (use the 'xla' attention implementation otherwise)"
        )
