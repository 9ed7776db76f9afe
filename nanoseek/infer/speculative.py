"""MTP speculative decoding: the engine's speculative decode step.

DeepSeek-V3's MTP modules are the drafter: module m at position i reads h^m_i (the main model's hidden state for
m = 0, module m-1's output otherwise) and the embedding of t_{i+m+1}, and predicts t_{i+m+2}. So after position
n-1 the modules in a chain propose d_1..d_K for positions n+1..n+K (K = `draft_tokens`, at most one per module the
checkpoint has). A verify step runs [t_n, d_1..d_K] through the main model at once and accepts drafts left to
right: greedy rows while each equals the target's argmax (so the output equals plain greedy decoding), sampled
rows by `speculative_accept` (so it is distributed exactly as without speculation). The first rejected draft is
replaced by the target's own token; when all pass, the token after them comes free. Then every module runs over
the new pairs (`_draft`, with `drafting.mtp_chain`), which both keeps its cache layer filled up to the newest
position and yields the next drafts.

`Speculation` is a base class of `Engine` and works on the engine's state: its model, cache, recorded steps
(`graphs`), `draft_tokens`, and the token-choosing steps every decode shares (`_choose`, `_penalise`, `_rule`,
`_emit`, `_greedy`, `_slots`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from nanoseek.infer.drafting import mtp_chain
from nanoseek.infer.sampling import probs_for, sample, speculative_accept, uniforms

if TYPE_CHECKING:
    from nanoseek.infer.engine import _Seq


class Speculation:
    """The speculative decode step of `Engine` (see the module docstring)."""

    def _decode_speculative(self, seqs: list[_Seq]) -> None:
        """Verify [pending token, d_1..d_K] for every row in one [B, K+1] forward; accept drafts left to right, take
        the target's token after the last accepted one; then draft the next K (`_draft`)."""
        dev, B, K = self.device, len(seqs), self.draft_tokens
        eligible = [bool(s.params.speculative and s.drafts) and self._rule(s) is None for s in seqs]
        greedy = self._greedy(seqs)
        if self.graphs is not None and all(eligible) and greedy and all(s.logprobs is None for s in seqs):
            return self._speculate_recorded(seqs)
        start = [s.n_cached for s in seqs]
        tokens = torch.tensor([[s.out[-1]] + (s.drafts or [0] * K) for s in seqs], device=dev)
        pos = torch.tensor(start, device=dev)[:, None] + torch.arange(K + 1, device=dev)
        if self.graphs is not None:
            h, logits, top = self.graphs.verify(tokens, pos)
        else:
            h = self.model.hidden_states(tokens, pos, self.cache.bind(self._slots(seqs), pos), prefill=False)
            logits = self.model.lm_head(h).float()
            top = logits.argmax(dim=-1)
        # Greedy rows with no repetition penalty: the argmaxes decide everything; read them back in one transfer.
        top = top.tolist() if greedy else None
        # sampled rows: two uniforms per depth (accept, resample), then one for the token after all K drafts
        u = None if greedy else uniforms([s.gen for s in seqs], 2 * K + 1).to(dev)
        # rows that cannot speculate now (a thinking rule is due, or no drafts yet): one token, as in _decode
        plain = [b for b in range(B) if not eligible[b]]
        if plain:
            r = torch.tensor(plain, device=dev)
            chosen = self._choose([seqs[b] for b in plain], logits[r, 0], u=None if top else u[r, 1],
                                  picked=[top[b][0] for b in plain] if top else None)
            for b, t in zip(plain, chosen):
                self._emit(seqs[b], t, logits, b, 0)
        alive = [b for b in range(B) if eligible[b]]
        for b in alive:
            seqs[b].drafted += K
        for i in range(K + 1):  # depth i: the token at position n+i+1, from logits row i
            if not alive:
                break
            sub = [seqs[b] for b in alive]
            if top:  # greedy: the argmaxes decide
                chosen = [top[b][i] for b in alive]
                accepted = [t == s.drafts[i] for t, s in zip(chosen, sub)] if i < K else []
            else:
                r = torch.tensor(alive, device=dev)
                if i < K:
                    chosen, accepted = self._judge(sub, i, logits[r, i], u[r, 2 * i: 2 * i + 2])
                else:  # every draft accepted: the target's next token comes free
                    chosen = self._choose(sub, logits[r, K], u=u[r, 2 * K], raw=True)
            if i == K:
                for b, t in zip(alive, chosen):
                    self._emit(seqs[b], t, logits, b, K)
                break
            survivors = []
            for b, t, a in zip(alive, chosen, accepted):
                s = seqs[b]
                s.accepted += int(a)
                self._emit(s, t, logits, b, i)
                if a and s.finish_reason is None and self._rule(s) is None:
                    survivors.append(b)
            alive = survivors
        live = [b for b, s in enumerate(seqs) if s.finish_reason is None and s.params.speculative]
        if live:  # module 0's new pairs: (h_i, t_{i+1}) for each position i whose token was emitted this step
            emitted = [seqs[b].n_cached - start[b] for b in live]
            T = max(emitted)
            idx = torch.tensor([[min(j, e - 1) for j in range(T)] for e in emitted], device=dev)
            rows = torch.tensor(live, device=dev)[:, None]
            new = torch.tensor([seqs[b].out[-e:] + [seqs[b].out[-1]] * (T - e) for b, e in zip(live, emitted)],
                               device=dev)
            self._draft([seqs[b] for b in live], h[rows, idx], new, pos[rows, idx], emitted, prefill=False)

    def _judge(self, seqs: list[_Seq], depth: int, logits: torch.Tensor, u: torch.Tensor
               ) -> tuple[list[int], list[bool]]:
        """Each row's token after its accepted drafts, from the target's logits there, and whether that token is
        the draft: greedy rows take the (penalised) argmax; sampled rows keep the draft with probability
        min(1, p/q), else sample from norm(max(0, p - q))."""
        proc = self._penalise(seqs, logits)
        tok = proc.argmax(dim=-1)
        d = torch.tensor([s.drafts[depth] for s in seqs], device=logits.device)
        acc = tok == d
        sampled = [b for b, s in enumerate(seqs) if s.params.temperature > 0]
        if sampled:
            r = torch.tensor(sampled, device=logits.device)
            p = probs_for(proc[r], [seqs[b].params for b in sampled])
            q = torch.stack([seqs[b].draft_qs[depth] for b in sampled])
            acc[r], tok[r] = speculative_accept(p, q, d[r], u[r, 0], u[r, 1])
        return tok.tolist(), acc.tolist()

    def _emit(self, s: _Seq, token: int, logits: torch.Tensor | None, *row: int) -> None:
        """The pending token is now in the cache; `token` (from `logits[row]`) is the new pending one."""
        s.n_cached += 1
        self._append(s, token, logits, *row)

    def _draft(self, seqs: list[_Seq], h: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
               real: list[int], prefill: bool) -> None:
        """The next K drafts of each row: the MTP modules in a chain over their new pairs (`mtp_chain`), module
        0's being (h, tokens) at `positions`, `real[b]` of them per row."""
        slots, greedy = self._slots(seqs), self._greedy(seqs)
        if self.graphs is not None and not prefill:
            forward = lambda m, h, t, p, only: self.graphs.mtp(m, h, t, p, slots, only)
        else:
            forward = lambda m, h, t, p, only: self.model.mtp_hidden(m, h, t, p, self.cache.bind(slots, p), prefill,
                                                                      only)
        for s in seqs:
            s.draft_qs = []
        last = torch.tensor(real, device=self.device) - 1
        drafts = mtp_chain(self.model, self.cache, self.draft_tokens, h, tokens, positions, last, slots, prefill,
                           forward, lambda m, logits: self._propose(seqs, logits, greedy))
        for s, row in zip(seqs, drafts.tolist()):
            s.drafts = row

    def _speculate_recorded(self, seqs: list[_Seq]) -> None:
        """`_decode_speculative` for greedy rows that all speculate, with no rule due: the verify forward, the
        accept rule and the next drafts run as one recorded step, and one read-back brings all of it."""
        K = self.draft_tokens
        limits = [self._draft_limit(s) for s in seqs]
        rows = self.graphs.speculate([[s.out[-1]] + s.drafts for s in seqs], [s.n_cached for s in seqs], limits)
        for s, limit, row in zip(seqs, limits, rows):
            top, drafts = row[: K + 1], row[K + 1:]
            a = next((i for i in range(K) if s.drafts[i] != top[i]), K)  # leading drafts equal to the argmax
            s.drafted += K
            for i, t in enumerate(top[: min(a, limit) + 1]):  # depth i emits the argmax there
                s.accepted += int(i < a)
                self._emit(s, t, None)
                if s.finish_reason is not None:
                    break
            s.drafts = drafts

    def _draft_limit(self, s: _Seq) -> int:
        """How many of s's drafts may be followed by a further token in this step: a thinking rule due after
        d_1..d_i ends the step there."""
        for i in range(1, len(s.drafts) + 1):
            if self._rule(s, extra=s.drafts[:i]) is not None:
                return i - 1
        return len(s.drafts)

    def _propose(self, seqs: list[_Seq], logits: torch.Tensor, greedy: bool) -> torch.Tensor:
        """One draft per row from an MTP module's logits [B, V]: the argmax for greedy rows, a sample from q
        otherwise (q kept for the accept rule)."""
        if greedy:
            return logits.argmax(dim=-1)
        logits = self._penalise(seqs, logits)
        drafts = logits.argmax(dim=-1)
        sampled = [b for b, s in enumerate(seqs) if s.params.temperature > 0]
        if sampled:
            r = torch.tensor(sampled, device=logits.device)
            q = probs_for(logits[r], [seqs[b].params for b in sampled])
            drafts[r] = sample(q, uniforms([seqs[b].gen for b in sampled], 1)[:, 0].to(q.device))
            for i, b in enumerate(sampled):
                seqs[b].draft_qs.append(q[i])
        return drafts
