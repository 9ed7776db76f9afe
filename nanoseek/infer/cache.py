"""The latent KV cache: per layer and token, only MLA's normalised c_kv and roped k_pe, side by side in one
vector of kv_lora_rank + qk_rope_head_dim values (absorbed attention uses it as both key and value).

Storage is slot-based for continuous batching: `num_slots` sequences of up to `max_len` tokens each. Before a
forward pass the engine `bind`s which slots the batch rows use and the position of every new token; each layer
then writes its latents at those positions and reads back everything its rows may attend to. Visibility comes
from positions alone (key s is visible to a query at position p iff s <= p), so rolling back rejected speculative
tokens costs nothing: the next write simply overwrites them.

With two or more MTP modules the cache also keeps, per slot, one hidden state for each module after the first
(`hidden` [slots, modules - 1, D]): in a decode step module m's first pair reads module m-1's output from the
step before (see `nanoseek.infer.drafting`). It is per-slot state that moves with the slot's latents.
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
        self.latent = torch.zeros(self.num_layers, num_slots, max_len, config.latent_cache_dim, dtype=dtype,
                                  device=device)  # [..., :kv_lora_rank] is c_kv, the rest k_pe
        self.slots: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.span = 0  # keys 0..span-1 are read back: the furthest bound position + 1
        self.block: tuple[int, int] | None = None  # the bound slots as a range, when they form one
        chained = config.num_nextn_predict_layers - 1 if include_mtp else 0
        self.hidden = (torch.zeros(num_slots, chained, config.hidden_size, dtype=dtype, device=device)
                       if chained > 0 else None)

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> int:
        """(kv_lora_rank + qk_rope_head_dim) x layers x element size: the main model's cache per token."""
        return config.latent_cache_dim * config.num_hidden_layers * torch.empty((), dtype=dtype).element_size()

    def bind(self, slots: torch.Tensor, positions: torch.Tensor) -> "LatentCache":
        """Rows of the next forward use `slots` [B]; its tokens sit at `positions` [B, T]."""
        # The host syncs of a forward, here rather than in every layer (a compiled step sees plain ints).
        self.span = int(positions.max()) + 1
        if self.span > self.max_len:
            raise ValueError(f"sequence would reach {self.span} tokens but the cache holds {self.max_len}; "
                             f"raise max_len or shorten the request")
        self.slots, self.positions = slots.to(self.latent.device), positions.to(self.latent.device)
        self.mask = self._visible(self.positions, self.span)
        # Rows in consecutive slots (the engine keeps its running batch so) are read as a view of the cache;
        # any other set of slots has to be gathered, a copy of everything the batch attends to, in every layer.
        rows = slots.tolist()
        first = rows[0] if rows else 0
        self.block = (first, first + len(rows)) if rows == list(range(first, first + len(rows))) else None
        return self

    def bind_fixed(self, slots: torch.Tensor, positions: torch.Tensor, span: int, view: bool = True) -> "LatentCache":
        """`bind` without a host sync, for a recorded (CUDA-graph) step: rows attend over a fixed `span` of keys and
        write to their entry of `slots` (padding rows: a scratch slot). With `view` they read slots 0..B-1 as a
        view (the running batch; padding rows read whatever follows it), else `slots` is gathered."""
        self.slots, self.positions, self.span = slots, positions, span
        self.mask = self._visible(positions, span)
        self.block = (0, len(slots)) if view else None
        return self

    @staticmethod
    def _visible(positions: torch.Tensor, span: int) -> torch.Tensor:
        """[B, T, span]: key s is visible to the query at position p iff s <= p. Every layer of a forward reads it."""
        return torch.arange(span, device=positions.device)[None, None, :] <= positions[:, :, None]

    def update(self, layer: int, c_kv: torch.Tensor, k_pe: torch.Tensor, read: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Store the new tokens' latents; with `read`, return what the rows may attend to (see LatentCacheView)."""
        slots, pos = self.slots, self.positions
        self.latent[layer, slots[:, None].expand_as(pos), pos] = torch.cat((c_kv, k_pe), dim=-1).to(self.latent.dtype)
        if not read:
            return None
        which = slice(*self.block) if self.block is not None else slots
        return self.latent[layer, which, : self.span], self.mask

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` to slot `dst`, in every layer (and its hidden states)."""
        self.latent[:, dst, :length] = self.latent[:, src, :length]
        if self.hidden is not None:
            self.hidden[dst] = self.hidden[src]
