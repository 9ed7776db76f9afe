"""The latent KV cache: per layer and token, only MLA's normalised c_kv and roped k_pe.

Storage is slot-based for continuous batching: `num_slots` sequences of up to `max_len` tokens each. Before a
forward pass the engine `bind`s which slots the batch rows use and the position of every new token; each layer
then writes its latents at those positions and reads back everything its rows may attend to. Visibility comes
from positions alone (key s is visible to a query at position p iff s <= p), so rolling back rejected speculative
tokens costs nothing: the next write simply overwrites them.
"""

from __future__ import annotations

import torch

from nanoseek.config import ModelConfig


class LatentCache:
    def __init__(self, config: ModelConfig, num_slots: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: str | torch.device | None = None, include_mtp: bool = True):
        self.num_layers = config.num_hidden_layers + (config.num_nextn_predict_layers if include_mtp else 0)
        self.num_main_layers = config.num_hidden_layers
        self.max_len = max_len
        shape = (self.num_layers, num_slots, max_len)
        self.c_kv = torch.zeros(*shape, config.kv_lora_rank, dtype=dtype, device=device)
        self.k_pe = torch.zeros(*shape, config.qk_rope_head_dim, dtype=dtype, device=device)
        self.slots: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.span = 0  # keys 0..span-1 are read back: the furthest bound position + 1

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> int:
        """(kv_lora_rank + qk_rope_head_dim) x layers x element size: the main model's cache per token."""
        return config.latent_cache_dim * config.num_hidden_layers * torch.empty((), dtype=dtype).element_size()

    def bind(self, slots: torch.Tensor, positions: torch.Tensor) -> "LatentCache":
        """Rows of the next forward use `slots` [B]; its tokens sit at `positions` [B, T]."""
        # The one host sync of a forward, here rather than in every layer (a compiled step sees a plain int).
        self.span = int(positions.max()) + 1
        if self.span > self.max_len:
            raise ValueError(f"sequence would reach {self.span} tokens but the cache holds {self.max_len}; "
                             f"raise max_len or shorten the request")
        self.slots, self.positions = slots.to(self.c_kv.device), positions.to(self.c_kv.device)
        return self

    def update(self, layer: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        slots, pos = self.slots, self.positions
        rows = slots[:, None].expand_as(pos)
        self.c_kv[layer, rows, pos] = c_kv.to(self.c_kv.dtype)
        self.k_pe[layer, rows, pos] = k_pe.to(self.k_pe.dtype)
        span = self.span
        mask = torch.arange(span, device=pos.device)[None, None, :] <= pos[:, :, None]
        return self.c_kv[layer, slots, :span], self.k_pe[layer, slots, :span], mask
