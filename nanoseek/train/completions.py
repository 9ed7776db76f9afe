"""Completions as training micro-batches, and their per-token log-probabilities under the policy.

A GRPO micro-batch holds G samples of a few prompts. Each distinct prompt runs through the model once
(`PromptLatents` records its latents), then every completion attends to its own prompt's latents and to its own
earlier tokens through the model's absorbed-attention path: the same log-probabilities as one causal forward over
every prompt + completion, with the prompts' share of the work cut G-fold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanoseek.model.transformer import DeepseekV3ForCausalLM


@dataclass
class MicroBatch:
    prompt_ids: torch.Tensor  # [p, Lp] the distinct prompts of these completions, right-padded
    prompt_lengths: torch.Tensor  # [p]
    prompt_index: torch.Tensor  # [n] which prompt each completion continues
    completion_ids: torch.Tensor  # [n, Lc] right-padded
    mask: torch.Tensor  # [n, Lc] 1 on the completion tokens that are trained
    advantages: torch.Tensor  # [n]
    ref_logps: torch.Tensor | None  # [n, Lc]
    old_logps: torch.Tensor | None  # [n, Lc], filled by the first pass
    num_sequences: float  # whole-batch normalisers / number of micro-batches (see grpo_loss)
    num_tokens: float
    tokens: int  # real (non-pad) tokens the forward runs over: each distinct prompt once, every completion
    metrics: dict[str, float]  # the rollout's statistics (same for each micro-batch of a step)


def right_padded(rows: list, pad: int, width: int | None = None) -> torch.Tensor:
    """Token-id rows as one [len(rows), width or the longest] tensor, right-padded with `pad`."""
    out = torch.full((len(rows), width or max(map(len, rows))), pad, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


class PromptLatents:
    """A differentiable `LatentCacheView` that lets G completions share one forward of their prompt.

    The first forward (the distinct prompts, prefill) records every layer's latents; the second (the completions)
    reads them back: each completion token attends to its own prompt's tokens and to its own earlier completion
    tokens. Gradients flow through both forwards, so this computes exactly what one forward over every
    prompt + completion would, without running each prompt G times."""

    def __init__(self, prompt_lengths: torch.Tensor, prompt_index: torch.Tensor, completion_len: int):
        n, Lc, Lp = len(prompt_index), completion_len, int(prompt_lengths.max())
        dev = prompt_lengths.device
        own_prompt = torch.arange(Lp, device=dev)[None, :] < prompt_lengths[prompt_index][:, None]  # [n, Lp]
        causal = torch.ones(Lc, Lc, dtype=torch.bool, device=dev).tril()
        self.mask = torch.cat((own_prompt[:, None].expand(n, Lc, Lp), causal.expand(n, Lc, Lc)), dim=2)
        self.index = prompt_index
        self.latents: dict[int, torch.Tensor] = {}

    def update(self, layer: int, c_kv: torch.Tensor, k_pe: torch.Tensor, read: bool = True):
        new = torch.cat((c_kv, k_pe), dim=-1)
        if not read:  # the prompts' forward
            self.latents[layer] = new
            return None
        return torch.cat((self.latents[layer][self.index], new), dim=1), self.mask


def token_logps(model: DeepseekV3ForCausalLM, mb: MicroBatch, temperature: float = 1.0) -> torch.Tensor:
    """log p(completion token t | its prompt, completion tokens < t) for every completion position: [n, Lc], at
    the sampling temperature (the policy we sampled). Each distinct prompt runs through the model once: with G
    samples per prompt, running it per sample made prompts almost half of a countdown update's tokens."""
    latents = PromptLatents(mb.prompt_lengths, mb.prompt_index, mb.completion_ids.shape[1])
    h_prompt = model.hidden_states(mb.prompt_ids, cache=latents, prefill=True)
    first = h_prompt[torch.arange(len(h_prompt), device=h_prompt.device), mb.prompt_lengths - 1]  # -> token 0
    start = mb.prompt_lengths[mb.prompt_index, None]
    pos = start + torch.arange(mb.completion_ids.shape[1], device=start.device)
    h = model.hidden_states(mb.completion_ids, pos, latents, prefill=False)
    h = torch.cat((first[mb.prompt_index, None], h[:, :-1]), dim=1)  # position t predicts completion token t
    logits = model.lm_head(h).float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.gather(F.log_softmax(logits, dim=-1), 2, mb.completion_ids[:, :, None]).squeeze(2)
