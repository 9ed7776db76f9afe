"""One pre-norm decoder layer: h = x + MLA(norm(x)); y = h + FFN(norm(h)), FFN dense or MoE by layer index."""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.mla import LatentCacheView, MultiHeadLatentAttention, pick
from nanoseek.model.moe import MLP, MoE
from nanoseek.model.norm import RMSNorm


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, moe: bool):
        super().__init__()
        self.self_attn = MultiHeadLatentAttention(config, layer_idx)
        self.mlp = MoE(config) if moe else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LatentCacheView | None = None, prefill: bool = True, only: torch.Tensor | None = None
                ) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D], or with `only` [B] just each row's output at index only[b]: [B, 1, D]."""
        h = self.self_attn(self.input_layernorm(x), cos, sin, cache, prefill, only)
        x = h + (x if only is None else pick(x, only))
        return x + self.mlp(self.post_attention_layernorm(x))
