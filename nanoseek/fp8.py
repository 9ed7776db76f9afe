"""Blockwise FP8 (DeepSeek-V3's recipe): float8_e4m3fn values with one float32 scale per 128x128 weight block.

This file starts with what checkpoint loading needs: turning an official FP8 weight and its `weight_scale_inv`
back into a high-precision tensor, and the inverse for writing one.
"""

from __future__ import annotations

import torch

BLOCK = 128
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def _expand_blocks(scale: torch.Tensor, shape: torch.Size, block: int = BLOCK) -> torch.Tensor:
    """Per-block scales [ceil(m/b), ceil(n/b)] -> per-element [m, n] (edge blocks are partial)."""
    return scale.repeat_interleave(block, 0)[: shape[0]].repeat_interleave(block, 1)[:, : shape[1]]


def dequantize_blockwise(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32,
                         block: int = BLOCK) -> torch.Tensor:
    """W = block value x `weight_scale_inv` (a multiplier, despite its name)."""
    expected = (-(-weight.shape[0] // block), -(-weight.shape[1] // block))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"FP8 scale has shape {list(scale_inv.shape)} but weight {list(weight.shape)} needs "
                         f"{list(expected)} for {block}x{block} blocks")
    return (weight.to(torch.float32) * _expand_blocks(scale_inv.float(), weight.shape, block)).to(dtype)


def quantize_blockwise(weight: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """W [m, n] -> (float8_e4m3fn [m, n], scale_inv [ceil(m/b), ceil(n/b)]) with scale = amax / 448 per block."""
    m, n = weight.shape
    pm, pn = -(-m // block) * block, -(-n // block) * block
    padded = torch.zeros(pm, pn, dtype=torch.float32, device=weight.device)
    padded[:m, :n] = weight.float()
    blocks = padded.view(pm // block, block, pn // block, block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / E4M3_MAX
    q = (blocks / scale_inv[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).view(pm, pn)[:m, :n]
    return q.to(torch.float8_e4m3fn), scale_inv
