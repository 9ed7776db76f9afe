"""Recorded decode steps: the engine's per-step forwards as CUDA graphs.

On a GPU a small model's decode step is a few hundred tiny kernels, and launching them one by one from Python
costs far more than running them. A CUDA graph records the launches once and replays them all with one call.
Four steps are recorded: a plain decode step ([B, 1] -> logits), a speculative verify step ([B, 2] -> hidden
states and logits), the MTP module's draft step ([B, 2] hidden states and tokens -> logits), and for greedy
speculation the last two fused with the accept rule between them (`speculate`), so that one replay and one read
back make a whole speculative step. A graph fixes every shape and address, so a recorded step differs from the
eager one in three ways:
- the batch is padded up to a bucket (1, 2, 4, 8, ... max_batch); padding rows write their latents into a scratch
  slot past the engine's own and their outputs are ignored;
- attention reads a fixed span of keys (the next power of two >= the furthest position, at least 64) and the
  cache's usual rule (a key is visible iff its position is <= the query's) hides the rest;
- inputs are copied into the recorded input buffers before each replay.
One graph per (forward, bucket, span), recorded the first time it is needed; all share one memory pool, so what a
call returns is valid until the next call. The same padded fixed-span steps run unrecorded on the CPU
(`record=False`), which is how the tests check them.
"""

from __future__ import annotations

import warnings

import torch

from nanoseek.infer.cache import LatentCache
from nanoseek.model.transformer import DeepseekV3ForCausalLM

MIN_SPAN = 64


class DecodeGraphs:
    """Recorded `decode`, `verify`, `mtp` and `speculate` steps over an engine's cache. The cache needs one slot
    more than `max_batch`: the last one is the padding rows' scratch. `speculate` reads and writes each slot's
    newest hidden state in the cache (`LatentCache.hidden`), the next draft step's input."""

    def __init__(self, model: DeepseekV3ForCausalLM, cache: LatentCache, max_batch: int, record: bool):
        self.model, self.cache, self.max_batch, self.record = model, cache, max_batch, record
        self.scratch = cache.latent.shape[1] - 1
        if self.scratch < max_batch:
            raise ValueError(f"the cache needs max_batch + 1 = {max_batch + 1} slots for recorded decoding, "
                             f"it has {self.scratch + 1}")
        dev = cache.latent.device
        # The recorded graphs read their inputs from here: token, position, slot and (speculate) whether a bonus
        # token may follow an accepted draft, for every row (up to 2 tokens).
        self.ids = torch.zeros(4, max_batch, 2, dtype=torch.long, device=dev)
        D, dtype = model.config.hidden_size, next(model.parameters()).dtype
        self.hidden = torch.zeros(max_batch, 2, D, dtype=dtype, device=dev)
        self.graphs: dict[tuple[str, int, int], tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]] = {}
        self.pool = torch.cuda.graph_pool_handle() if record else None

    def bucket(self, batch: int) -> int:
        return min(1 << (batch - 1).bit_length(), self.max_batch)

    def span(self, furthest: int) -> int:
        return min(max(MIN_SPAN, 1 << (furthest - 1).bit_length()), self.cache.max_len)

    # ------------------------------------------------------------------------------------------ the steps
    # Each step also returns its logits' argmaxes: for greedy rows they are the answer, and reading back a few
    # integers recorded in the graph saves a launch per step (on a virtualised GPU every call costs tens of µs).
    def decode(self, tokens: list[int], positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row (rows in slots 0..B-1) -> (logits [B, V] float32, argmax [B])."""
        return self._run("decode", [[t] for t in tokens], [[p] for p in positions], list(range(len(tokens))))

    def verify(self, tokens: list[list[int]], positions: list[list[int]]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[pending token, draft] per row (slots 0..B-1) -> (hidden states [B, 2, D]; logits [B, 2, V]; argmax
        [B, 2])."""
        return self._run("verify", tokens, positions, list(range(len(tokens))))

    def mtp(self, hidden: torch.Tensor, tokens: list[list[int]], positions: list[list[int]], slots: list[int]
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP module 0 over two (hidden state, next token) pairs per row, rows in any `slots` -> (logits at the
        second pair [B, V], their argmax [B]): the next draft."""
        self.hidden[: len(tokens)].copy_(hidden)
        return self._run("mtp", tokens, positions, slots)

    def speculate(self, tokens: list[list[int]], positions: list[list[int]], bonus_ok: list[bool]) -> list[list[int]]:
        """A whole greedy speculative step for rows in slots 0..B-1: verify [pending token, draft], accept the
        draft iff it is the argmax, run the MTP module over the right (hidden state, token) pairs, keep the newest
        hidden state in the cache. -> per row [argmax after the pending token, argmax after the draft, the next draft]."""
        flags = [[int(ok), 0] for ok in bonus_ok]
        return self._run("speculate", tokens, positions, list(range(len(tokens))), flags)[0].tolist()

    # ------------------------------------------------------------------------------------------ recording
    def _run(self, kind: str, tokens: list[list[int]], positions: list[list[int]], slots: list[int],
             flags: list[list[int]] | None = None) -> tuple[torch.Tensor, ...]:
        B, T = len(tokens), len(tokens[0])
        padded, span = self.bucket(B), self.span(max(max(p) for p in positions) + 1)
        pad = padded - B
        host = torch.tensor([tokens + [[0] * T] * pad, positions + [[0] * T] * pad,
                             [[s] * T for s in slots] + [[self.scratch] * T] * pad,
                             (flags or [[0] * T] * B) + [[0] * T] * pad])
        self.ids[:, :padded, :T].copy_(host)
        key = (kind, padded, span)
        if self.record and key not in self.graphs:
            try:
                self.graphs[key] = self._record(kind, padded, span)
            except RuntimeError as e:  # an op that cannot be recorded: decode eagerly from now on, still correct
                warnings.warn(f"CUDA graphs are off for this engine, recording a decode step failed: {e}")
                self.record = False
        if not self.record:
            outs = self._step(kind, padded, span)
        else:
            graph, outs = self.graphs[key]
            graph.replay()
        return tuple(o[:B] for o in outs)

    def _step(self, kind: str, padded: int, span: int) -> tuple[torch.Tensor, ...]:
        T = 1 if kind == "decode" else 2
        tokens, positions, slots = self.ids[0, :padded, :T], self.ids[1, :padded, :T], self.ids[2, :padded, 0]
        if kind == "speculate":
            return (self._speculate(tokens, positions, slots, self.ids[3, :padded, 0], span),)
        if kind == "mtp":  # rows in any slots: the cache gathers them
            cache = self.cache.bind_fixed(slots, positions, span, view=False)
            logits = self.model.mtp_step(0, self.hidden[:padded], tokens, positions, cache, prefill=False)[0]
            return logits[:, 1].float(), logits[:, 1].float().argmax(dim=-1)
        h = self.model.hidden_states(tokens, positions, self.cache.bind_fixed(slots, positions, span), prefill=False)
        if kind == "decode":
            logits = self.model.lm_head(h[:, 0]).float()
            return logits, logits.argmax(dim=-1)
        logits = self.model.lm_head(h).float()
        return h, logits, logits.argmax(dim=-1)

    def _speculate(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, bonus_ok: torch.Tensor,
                   span: int) -> torch.Tensor:
        """The engine's greedy speculative step (`Engine._decode_speculative`) with no host in between."""
        model = self.model
        h = model.hidden_states(tokens, positions, self.cache.bind_fixed(slots, positions, span), prefill=False)
        top = model.lm_head(h).float().argmax(dim=-1)  # [B, 2]
        # Accepted with a bonus token: the next draft reads (h_n, draft), (h_n+1, bonus) at n, n+1. Otherwise the
        # row emitted one token: (h_n-1, pending), (h_n, emitted) at n-1, n.
        take = ((tokens[:, 1] == top[:, 0]) & (bonus_ok == 1))[:, None]
        kept = self.cache.hidden
        pair_h = torch.where(take[..., None], h, torch.stack((kept[slots], h[:, 0]), dim=1))
        pair_tok = torch.where(take, torch.stack((tokens[:, 1], top[:, 1]), dim=1),
                               torch.stack((tokens[:, 0], top[:, 0]), dim=1))
        pair_pos = (positions - (~take).long()).clamp(min=0)  # (padding rows sit at 0)
        logits, _ = model.mtp_step(0, pair_h, pair_tok, pair_pos, self.cache.bind_fixed(slots, pair_pos, span),
                                   prefill=False)
        kept[slots] = torch.where(take, h[:, 1], h[:, 0])
        return torch.cat((top, logits[:, 1].float().argmax(dim=-1, keepdim=True)), dim=1)

    def _record(self, kind: str, padded: int, span: int) -> tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]:
        # One eager run first, on a side stream as torch asks: lazy initialisation (cuBLAS handles, autotuning)
        # must not happen while recording. It performs this very step, which the first replay repeats: the same
        # cache writes, and the kept hidden states are put back so that the replay reads what the warm-up read.
        kept = None if self.cache.hidden is None else self.cache.hidden.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._step(kind, padded, span)
        torch.cuda.current_stream().wait_stream(side)
        if kept is not None:
            self.cache.hidden.copy_(kept)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outs = self._step(kind, padded, span)
        return graph, outs
