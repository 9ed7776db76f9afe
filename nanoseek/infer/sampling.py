"""From logits to tokens: sampling parameters, the logit transforms, and speculative acceptance.

Every function here works on a whole batch at once ([B, V] logits, one parameter per row), so the engine pays
one set of tensor ops per decode step however many requests are running. Randomness comes in as uniforms
drawn from each request's own `torch.Generator`; sampling is then a deterministic function of (probs, u), which
is what makes a seed reproduce its output whatever else shares the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass
class SamplingParams:
    """How one request decodes. `temperature=0` is greedy; `top_k=0`, `top_p=1`, `min_p=0` switch those off."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0  # also report this many most likely alternatives per token
    thinking_budget: int | None = None  # at most this many tokens inside <think>, then </think> is forced
    min_thinking_tokens: int | None = None  # before this many, an attempt to stop thinking becomes "Wait"
    speculative: bool = False  # draft with the model's MTP module, verify with the main model

    def validate(self) -> "SamplingParams":
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        if isinstance(self.stop, str):
            self.stop = [self.stop]
        need(isinstance(self.max_tokens, int) and self.max_tokens > 0,
             f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        need(math.isfinite(self.temperature) and self.temperature >= 0,
             f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        need(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")
        need(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        need(self.repetition_penalty > 0, f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        need(self.top_logprobs >= 0, f"top_logprobs must be >= 0, got {self.top_logprobs}")
        need(all(isinstance(s, str) and s for s in self.stop), f"stop strings must be non-empty strings, got {self.stop!r}")
        need(self.thinking_budget is None or self.thinking_budget >= 0,
             f"thinking_budget must be >= 0, got {self.thinking_budget}")
        need(self.min_thinking_tokens is None or self.min_thinking_tokens >= 0,
             f"min_thinking_tokens must be >= 0, got {self.min_thinking_tokens}")
        need(self.thinking_budget is None or self.min_thinking_tokens is None
             or self.min_thinking_tokens <= self.thinking_budget,
             f"min_thinking_tokens ({self.min_thinking_tokens}) cannot exceed thinking_budget ({self.thinking_budget})")
        return self


def penalise_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL's repetition penalty: a seen token's logit is divided by p if positive, multiplied by p if negative."""
    p = penalty[:, None].to(logits.dtype)
    return torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)


def uniforms(generators: Sequence[torch.Generator | None], k: int) -> torch.Tensor:
    """k uniforms per row from each request's own generator (zeros for greedy rows, which never use them)."""
    return torch.stack([torch.rand(k, generator=g) if g is not None else torch.zeros(k) for g in generators])


def penalise_rows(logits: torch.Tensor, seen: Sequence[torch.Tensor | None], penalty: Sequence[float]) -> torch.Tensor:
    """`penalise_repeats` on the rows that have a seen-token mask (the others have no penalty)."""
    rows = [b for b, mask in enumerate(seen) if mask is not None]
    if not rows:
        return logits
    r = torch.tensor(rows, device=logits.device)
    logits = logits.clone()
    logits[r] = penalise_repeats(logits[r], torch.stack([seen[b] for b in rows]),
                                 torch.tensor([penalty[b] for b in rows], device=logits.device))
    return logits


def probs_for(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """`probs_from_logits` with each row's own temperature and filters."""
    col = lambda name, dtype=torch.float32: torch.tensor([getattr(p, name) for p in params], dtype=dtype,
                                                         device=logits.device)
    if not any(p.top_k > 0 or p.top_p < 1 or p.min_p > 0 for p in params):
        return probs_from_logits(logits, col("temperature"))  # no filters (RL rollouts): no sort
    return probs_from_logits(logits, col("temperature"), col("top_p"), col("top_k", torch.long), col("min_p"))


def probs_from_logits(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor | None = None,
                      top_k: torch.Tensor | None = None, min_p: torch.Tensor | None = None) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p truncation; returns normalised probs [B, V] in float32.

    Rows must have temperature > 0 (greedy rows take the argmax elsewhere). One sort serves all three filters;
    with none given (no row filters) there is nothing to sort.
    """
    probs = (logits.float() / temperature[:, None]).softmax(dim=-1)
    if top_p is None and top_k is None and min_p is None:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(probs.shape[-1], device=probs.device)[None]
    k = torch.where(top_k > 0, top_k, probs.shape[-1])[:, None]
    keep = rank < k
    # top-p: keep a token while the mass *before* it is under p, so the first token always survives
    keep &= (sorted_p.cumsum(dim=-1) - sorted_p) < top_p[:, None]
    keep &= sorted_p >= min_p[:, None] * sorted_p[:, :1]
    sorted_p = sorted_p * keep
    probs = torch.zeros_like(probs).scatter_(1, order, sorted_p)
    return probs / probs.sum(dim=-1, keepdim=True)


def sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: row b takes the first token whose cumulative prob exceeds u[b] * total (u in [0, 1)).

    `right=True` means a zero-probability token (a flat stretch of the CDF) can never be chosen.
    """
    cdf = probs.float().cumsum(dim=-1)
    target = (u.to(cdf.device, cdf.dtype) * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, target, right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)


def speculative_accept(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, u_accept: torch.Tensor,
                       u_resample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculative-sampling rule (Leviathan et al. 2023; Chen et al. 2023) for one drafted token per row.

    The draft d was sampled from q. Keep it with probability min(1, p(d)/q(d)); otherwise sample from
    norm(max(0, p - q)). Whatever q is, the emitted token is then distributed exactly as p. Returns
    (accepted [B] bool, token [B]).
    """
    pd = p.gather(1, draft[:, None])[:, 0]
    qd = q.gather(1, draft[:, None])[:, 0]
    accepted = u_accept.to(pd.device) * qd < pd  # u < p/q without dividing by zero
    residual = (p - q).clamp_min(0)
    empty = residual.sum(dim=-1, keepdim=True) <= 0  # p == q: rejection cannot happen, but keep it well-defined
    residual = torch.where(empty, p, residual)
    token = torch.where(accepted, draft, sample(residual, u_resample))
    return accepted, token
