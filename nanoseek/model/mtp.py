"""Multi-token prediction (DeepSeek-V3 sec. 2.2): module k predicts the token k+1 steps ahead.

h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]) (embedding first, as vLLM/SGLang read the checkpoints),
then one full decoder layer, then the shared output head after `shared_head.norm`. h^0 is the main model's final
(normed) hidden state, the same one the head reads. The embedding and head are the main model's own: no copies
in memory (checkpoints still carry them at `embed_tokens` / `shared_head.head`, as the Hub layout does).
During training this adds a denser signal; at inference the module drafts tokens for speculative decoding.
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.block import DecoderLayer
from nanoseek.model.linear import Linear
from nanoseek.model.mla import LatentCacheView
from nanoseek.model.norm import RMSNorm


class SharedHead(nn.Module):
    """Holds only the MTP module's final norm; the projection is the main `lm_head` (passed in at call time)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPModule(DecoderLayer):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx, moe=config.n_routed_experts > 0)
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = SharedHead(config)

    def forward(self, hidden: torch.Tensor, next_embeds: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LatentCacheView | None = None, prefill: bool = True, only: torch.Tensor | None = None
                ) -> torch.Tensor:
        """hidden h^{k-1} [B, T, D] and Emb(t_{i+k}) [B, T, D] -> this module's normed hidden h^k [B, T, D] (with
        `only`, [B, 1, D]: see DecoderLayer)."""
        x = self.eh_proj(torch.cat((self.enorm(next_embeds), self.hnorm(hidden)), dim=-1))
        return self.shared_head.norm(super().forward(x, cos, sin, cache, prefill, only))
