"""DeepSeek-V3 as a causal language model: embeddings, decoder layers, final norm, head, MTP modules, losses.

Module names follow Hugging Face's `DeepseekV3ForCausalLM`, so `state_dict()` keys are the Hub's (routed experts
aside: fused here, split per expert by `nanoseek.checkpoint`). MTP module k sits at `model.layers[L + k]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.block import DecoderLayer
from nanoseek.model.linear import Linear
from nanoseek.model.mla import LatentCacheView
from nanoseek.model.moe import MoE, RoutedExperts, Router
from nanoseek.model.mtp import MTPModule
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import RotaryEmbedding

IGNORE_INDEX = -100


class DeepseekV3Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        L = config.num_hidden_layers
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        layers: list[nn.Module] = [DecoderLayer(config, i, config.is_moe_layer(i)) for i in range(L)]
        layers += [MTPModule(config, L + k) for k in range(config.num_nextn_predict_layers)]
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.num_main_layers = L


class DeepseekV3ForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config.validate()
        self.model = DeepseekV3Model(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()

    # ------------------------------------------------------------------------------------ structure
    @property
    def main_layers(self) -> list[DecoderLayer]:
        return list(self.model.layers[: self.model.num_main_layers])

    @property
    def mtp_modules(self) -> list[MTPModule]:
        return list(self.model.layers[self.model.num_main_layers :])

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Hugging Face's init: N(0, initializer_range) for every matrix, ones for norms, zero biases and bias b."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
            elif isinstance(m, Router):
                m.weight.normal_(0.0, std)
                m.e_score_correction_bias.zero_()
            elif isinstance(m, RoutedExperts):
                m.gate_up_proj.normal_(0.0, std)
                m.down_proj.normal_(0.0, std)

    # ------------------------------------------------------------------------------------ forward
    def _positions(self, input_ids: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return positions

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      cache: LatentCacheView | None = None, prefill: bool = True) -> torch.Tensor:
        """Final normed hidden states [B, T, D] (what the head and the first MTP module read)."""
        cos, sin = self.model.rotary_emb(self._positions(input_ids, positions))
        x = self.model.embed_tokens(input_ids)
        for layer in self.main_layers:
            x = layer(x, cos, sin, cache, prefill)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: LatentCacheView | None = None, prefill: bool = True) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab]. With a cache, `prefill=True` means these tokens start fresh
        sequences (full attention over themselves); `prefill=False` attends over everything cached (absorbed)."""
        return self.lm_head(self.hidden_states(input_ids, positions, cache, prefill))

    def mtp_hidden(self, k: int, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor | None = None,
                   cache: LatentCacheView | None = None, prefill: bool = True, only: torch.Tensor | None = None
                   ) -> torch.Tensor:
        """Run MTP module k (0-based) on h^{k} [B, T, D] and the following tokens [B, T]: h^{k+1} [B, T, D]. With
        `only` [B], just each row's output at index only[b], [B, 1, D]; the cache still gets every pair."""
        cos, sin = self.model.rotary_emb(self._positions(next_ids, positions))
        return self.mtp_modules[k](hidden, self.model.embed_tokens(next_ids), cos, sin, cache, prefill, only)

    def mtp_step(self, k: int, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor | None = None,
                 cache: LatentCacheView | None = None, prefill: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """`mtp_hidden` and the shared head over it: (logits [B, T, V], h^{k+1})."""
        h = self.mtp_hidden(k, hidden, next_ids, positions, cache, prefill)
        return self.lm_head(h), h

    # ------------------------------------------------------------------------------------ training loss
    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, mtp_weight: float | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Next-token cross-entropy + (lambda / D) * sum of MTP losses + MoE auxiliary losses.

        targets [B, T] are the inputs shifted by one (IGNORE_INDEX where no loss is wanted); module k (0-based)
        predicts targets k+1.. (see `mtp_logits`).
        """
        lam = self.config.mtp_loss_weight if mtp_weight is None else mtp_weight
        h = self.hidden_states(input_ids)
        main = F.cross_entropy(self.lm_head(h).flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
        metrics = {"main_loss": main.detach()}
        total = main
        if self.mtp_modules and lam > 0:
            mtp_losses = [F.cross_entropy(logits.flatten(0, 1).float(), targets[:, k + 1 :].flatten(),
                                          ignore_index=IGNORE_INDEX)
                          for k, logits in enumerate(self.mtp_logits(h, input_ids))]
            if mtp_losses:
                mtp = torch.stack(mtp_losses).mean()
                metrics["mtp_loss"] = mtp.detach()
                total = total + lam * mtp
        aux = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        if aux:
            aux_total = torch.stack(aux).sum()
            metrics["aux_loss"] = aux_total.detach()
            total = total + aux_total
        return total, metrics

    def mtp_logits(self, h: torch.Tensor, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """The MTP chain over a training sequence, from the main model's hidden states h [B, T, D]: module k sees
        h^{k-1} at positions 0..T-k-2 with the embeddings of input tokens k+1..T-1, so its logits [B, T-k-1, V]
        are for targets k+1..T-1. Each depth has one fewer position, and the paper's causal chain is kept."""
        out, T = [], input_ids.shape[1]
        for k in range(min(len(self.mtp_modules), T - 1)):
            logits, h = self.mtp_step(k, h[:, : T - k - 1], input_ids[:, k + 1 :])
            out.append(logits)
        return out

    @torch.no_grad()
    def update_expert_bias(self) -> list[dict[str, float]]:
        """Call after each optimizer step: the aux-loss-free bias update for every MoE layer, with its load stats."""
        return [m.update_bias() for m in self.moe_layers()]
