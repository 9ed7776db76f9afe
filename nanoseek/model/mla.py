"""Multi-head latent attention (DeepSeek-V2/V3), with its two paths.

Every token is compressed to a small latent: c_kv = RMSNorm(W_DKV x) (`kv_lora_rank` values) plus one roped key
k_pe (`qk_rope_head_dim` values) shared by all heads. Per-head keys and values are up-projections of the latent.

* Full path (training, prefill): expand the latent into per-head K [.., nope + rope] and V, then call
  `scaled_dot_product_attention`. This is the fastest way to train.
* Absorbed path (decode over a cache): W_UK is folded into the query and W_UV into the output, so attention runs
  directly over the cached latents: logit = (q_nope W_UK) . c_kv + q_pe . k_pe. The cache then holds only
  `kv_lora_rank + qk_rope_head_dim` values per token per layer instead of H * (qk_head_dim + v_head_dim).

Both paths compute the same function and are tested equal.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.linear import Linear, bf16_as_fp32, emulate_bf16
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import apply_rope


class LatentCacheView(Protocol):
    """What attention needs from a KV cache (implemented by `nanoseek.infer.cache.LatentCache`)."""

    def update(self, layer: int, c_kv: torch.Tensor, k_pe: torch.Tensor, read: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Store the new tokens' latents; with `read`, return everything cached for these sequences as
        [c_kv | k_pe] [B, S, C + R] and the boolean mask [B, T, S] of keys each new query may see."""
        ...


def pick(x: torch.Tensor, only: torch.Tensor) -> torch.Tensor:
    """x [B, T, ...] -> x[b, only[b]] for every row b, as [B, 1, ...]."""
    return x[torch.arange(x.shape[0], device=x.device), only][:, None]


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.nope, self.rope, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.scale = config.softmax_scale
        self.interleave = config.rope_interleave
        qk_dim, bias = config.qk_head_dim, config.attention_bias

        if config.q_lora_rank is None:
            self.q_proj = Linear(config.hidden_size, self.num_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = Linear(config.hidden_size, config.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank)  # eps 1e-6 regardless of config, as HF does
            self.q_b_proj = Linear(config.q_lora_rank, self.num_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(config.hidden_size, config.kv_lora_rank + self.rope, bias=bias)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank)
        self.kv_b_proj = Linear(config.kv_lora_rank, self.num_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = Linear(self.num_heads * self.v_dim, config.hidden_size, bias=bias)

    # ------------------------------------------------------------------------------------ projections
    def queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> q_nope [B, T, H, nope], roped q_pe [B, T, H, rope]."""
        B, T, _ = x.shape
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(B, T, self.num_heads, self.nope + self.rope).split([self.nope, self.rope], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin, self.interleave)

    def latents(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> normalised c_kv [B, T, C] and roped k_pe [B, T, R]: exactly what the cache stores."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope], dim=-1)
        k_pe = apply_rope(k_pe[:, :, None], cos, sin, self.interleave)[:, :, 0]
        return self.kv_a_layernorm(c_kv), k_pe

    # ------------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LatentCacheView | None = None, full: bool = True, only: torch.Tensor | None = None
                ) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]. `only` [B]: just the output at index only[b] of each row is wanted, [B, 1, D]
        (every token's latent is still cached)."""
        c_kv, k_pe = self.latents(x, cos, sin)
        if cache is not None and not full:
            if only is not None:  # over a cache, the other queries need not be computed at all
                x, cos, sin = pick(x, only), pick(cos, only), pick(sin, only)
            latent, mask = cache.update(self.layer_idx, c_kv, k_pe)
            return self.o_proj(self._absorbed(*self.queries(x, cos, sin), latent, mask if only is None
                                              else pick(mask, only)))
        if cache is not None:  # a fresh prompt: its own tokens are the whole context, so the fast expanded path
            cache.update(self.layer_idx, c_kv, k_pe, read=False)
        out = self.o_proj(self._full(*self.queries(x, cos, sin), c_kv, k_pe))
        return out if only is None else pick(out, only)

    def _full(self, q_nope, q_pe, c_kv, k_pe) -> torch.Tensor:
        B, T, H, _ = q_nope.shape
        k_nope, v = self.kv_b_proj(c_kv).view(B, T, H, self.nope + self.v_dim).split([self.nope, self.v_dim], dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        k = torch.cat((k_nope, k_pe[:, :, None].expand(B, T, H, self.rope)), dim=-1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if emulate_bf16(q):
            # No native bf16 on this CPU: attend over the bf16-rounded q, k, v in float32 (see linear.py).
            with torch.autocast("cpu", enabled=False):
                out = self._sdpa(bf16_as_fp32(q), bf16_as_fp32(k), bf16_as_fp32(v)).to(torch.bfloat16)
        else:
            out = self._sdpa(q, k, v)
        return out.transpose(1, 2).reshape(B, T, H * self.v_dim)

    def _sdpa(self, q, k, v) -> torch.Tensor:
        pad = q.shape[-1] - v.shape[-1]
        if q.device.type == "cpu" and pad > 0:
            # torch's fused CPU attention needs one head dim for q, k and v, else it drops to the slow unfused
            # math path (2-5x slower here). Zero columns in V only add zero output columns: slice them off.
            return F.scaled_dot_product_attention(q, k, F.pad(v, (0, pad)), is_causal=True, scale=self.scale)[..., :-pad]
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)

    def _absorbed(self, q_nope, q_pe, latent, mask) -> torch.Tensor:
        """Attention over cached latents [c_kv | k_pe] [B, S, C + R]: one key/value 'head' shared by all heads."""
        B, T, H, _ = q_nope.shape
        C, S = self.kv_lora_rank, latent.shape[1]
        w = self.kv_b_proj.weight.view(H, self.nope + self.v_dim, C)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope :]
        q_latent = torch.einsum("bthn,hnc->bthc", q_nope, w_uk.to(q_nope.dtype))
        # logit = [q_nope W_UK | q_pe] . [c_kv | k_pe]. Since every head reads the same keys, the H heads of one
        # query position are rows of one single-head attention: SDPA's "heads" are the T positions, each over the
        # same keys (a view, no copy) with its own mask row, broadcast over its H rows. The value is the latent
        # too, and the output's k_pe columns are dropped.
        q = torch.cat((q_latent, q_pe.to(q_latent.dtype)), dim=-1)  # [B, T, H, C + R]
        kv = latent[:, None].to(q.dtype).expand(B, T, S, C + self.rope)
        o_latent = F.scaled_dot_product_attention(q, kv, kv, attn_mask=mask[:, :, None], scale=self.scale)[..., :C]
        out = torch.einsum("bthc,hvc->bthv", o_latent.to(w_uv.dtype), w_uv)
        return out.reshape(B, T, H * self.v_dim).to(q_nope.dtype)
