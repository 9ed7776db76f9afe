"""MTP drafting: DeepSeek-V3's multi-token-prediction modules as the draft model of speculative decoding.

Module m at position i reads h^m_i and the embedding of t_{i+m+1} and predicts t_{i+m+2}; h^0 is the main model's
final hidden state and h^m (m >= 1) module m-1's output (DeepSeek-V3 sec. 2.2). After the main model has seen
position n-1, module 0 there proposes d_1 for position n+1 from (h_{n-1}, t_n); module 1 at the same position
proposes d_2 from (its output, d_1); and so on. Every module attends over its own cache layer, so each step
every module must also write the pairs of the positions that became known.

`mtp_chain` is that step for a batch of rows, whatever runs the forwards (eager, recorded CUDA graphs, or inside
one recorded graph). Module 0 gets its new pairs [B, T], `last[b] + 1` of them real per row, the last one the
newest (h_{n-1}, t_n); shorter rows repeat their last pair, which writes the same cache entry again. Module m's m
pairs before its newest held drafts last step (d_1..d_m stood in for tokens not yet known), so in a decode step
it redoes them: it starts m positions before module 0, from module m-1's output there, kept per slot from the
step before (`LatentCache.hidden`). In a prefill every module covers the whole prompt. The last module's
output matters only at the newest pair (its draft): at the others it just writes its cache entry, so only that
pair runs on past attention's latents (a third of a step's MTP time at two drafts on `tiny`, CPU).
"""

from __future__ import annotations

from typing import Callable

import torch

from nanoseek.infer.cache import LatentCache
from nanoseek.model.transformer import DeepseekV3ForCausalLM

# forward(m, hidden [B, T, D], tokens [B, T], positions [B, T], only) -> module m's output [B, T, D], or with
# `only` [B] (not None) just each row's output at index only[b], [B, 1, D]
Forward = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
# propose(m, logits [B, V] at each row's newest pair) -> the drafts [B]
Propose = Callable[[int, torch.Tensor], torch.Tensor]


def mtp_chain(model: DeepseekV3ForCausalLM, cache: LatentCache, num_drafts: int, hidden: torch.Tensor,
              tokens: torch.Tensor, positions: torch.Tensor, last: torch.Tensor, slots: torch.Tensor, prefill: bool,
              forward: Forward, propose: Propose) -> torch.Tensor:
    """Run modules 0..num_drafts-1 over their new pairs, starting from module 0's (see the module docstring);
    returns the drafts [B, num_drafts]. Only tensor ops: it runs inside a recorded graph as well."""
    at = torch.arange(hidden.shape[0], device=hidden.device)
    newest = positions[at, last]  # n-1
    drafts = []
    for m in range(num_drafts):
        final = m + 1 == num_drafts  # the last module's output is wanted only at the newest pair, for its draft
        out = forward(m, hidden, tokens, positions, last if final else None)
        drafts.append(propose(m, model.lm_head(out[:, 0] if final else out[at, last]).float()))
        if final:
            break
        # Module m+1's pairs: (module m's output, the token one further ahead). Keep module m's output at
        # position n-1-m: next step, module m+1 starts there.
        kept = cache.hidden[slots, m]
        cache.hidden[slots, m] = out[at, (newest - m - positions[:, 0]).clamp(min=0)]
        if prefill:
            hidden, tokens = out, torch.cat((tokens[:, 1:], tokens[:, -1:]), dim=1)
        else:
            hidden, last = torch.cat((kept[:, None], out), dim=1), last + 1
            tokens = torch.cat((tokens, tokens[:, -1:]), dim=1)
            # (on a prompt shorter than m tokens the first position would be negative: redo position 0 instead)
            positions = torch.cat((positions[:, :1] - 1, positions), dim=1).clamp(min=0)
        after = torch.arange(tokens.shape[1], device=tokens.device)[None] >= last[:, None]
        tokens = torch.where(after, drafts[-1][:, None], tokens)  # the newest pair's token is d_{m+1}
    return torch.stack(drafts, dim=1)
