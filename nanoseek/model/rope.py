"""Rotary position embedding over MLA's decoupled 64-dim slice, with YaRN context extension.

DeepSeek rotates *adjacent* pairs (2i, 2i+1) (`rope_interleave=True`); the classic layout rotates (i, i+d/2).
Both are the same rotation applied to a different pairing of channels, so one function handles both and always
returns the de-interleaved layout [rotated evens | rotated odds]. Queries and keys are permuted alike, so dot
products, and therefore attention, are unchanged; the latent cache stores keys in this same layout.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nanoseek.config import ModelConfig, rope_type, yarn_mscale


def rope_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for each rotary pair, and the factor that scales cos/sin (1.0 for DeepSeek-V3).

    YaRN keeps high-frequency pairs (which complete many turns inside the original context) as they are, divides
    low-frequency pairs by `factor`, and blends linearly in between; the blend range comes from how many turns
    each pair makes over `original_max_position_embeddings` (beta_fast and beta_slow turns).
    """
    dim, base = config.qk_rope_head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    rs = config.rope_scaling or {}
    if rope_type(rs) != "yarn":
        return inv_freq, 1.0

    factor = float(rs["factor"])
    original = float(rs["original_max_position_embeddings"])
    beta_fast, beta_slow = float(rs.get("beta_fast") or 32), float(rs.get("beta_slow") or 1)

    def pair_index_for_turns(turns: float) -> float:
        # The pair index whose wavelength fits `turns` times into the original context.
        return dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(base))

    low, high = pair_index_for_turns(beta_fast), pair_index_for_turns(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero in the ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: keep the original frequency, 0: interpolate fully
    inv_freq = inv_freq / factor * (1 - keep) + inv_freq * keep

    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")
        if mscale and mscale_all:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
        else:
            attention_factor = yarn_mscale(factor)
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        inv_freq, self.attention_factor = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.interleave = config.rope_interleave

    @torch.no_grad()
    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, T, 1, rope_dim/2] in float32 (broadcast over heads)."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq.to(positions.device)
        return (angles.cos() * self.attention_factor)[:, :, None], (angles.sin() * self.attention_factor)[:, :, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = True) -> torch.Tensor:
    """Rotate x [B, T, H, rope_dim] by position; returns the de-interleaved layout in x's dtype."""
    # Two spellings of the same arithmetic (tested equal): eager, a complex product is a handful of kernels
    # instead of ten (decoding a small model on a GPU is bound by how many kernels it launches); compiled, the
    # real form fuses into one kernel, while inductor cannot generate code for complex numbers at all.
    return (_rotate_real if torch.compiler.is_compiling() else _rotate_complex)(x, cos, sin, interleave)


def _rotate_complex(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    # Each pair (x1, x2) as x1 + i x2 times cos + i sin: the real parts are the rotated x1s, the imaginary the x2s.
    xf = x.float()
    pairs = xf.unflatten(-1, (-1, 2)) if interleave else xf.unflatten(-1, (2, -1)).transpose(-1, -2)
    rotated = torch.view_as_complex(pairs.contiguous()) * torch.complex(cos, sin)
    return torch.view_as_real(rotated).transpose(-1, -2).flatten(-2).to(x.dtype)


def _rotate_real(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleave else x.chunk(2, dim=-1)
    x1, x2 = x1.float(), x2.float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
