"""Recorded decode steps: the engine's per-step forwards as CUDA graphs.

On a GPU a small model's decode step is a few hundred tiny kernels, and launching them one by one from Python
costs far more than running them. A CUDA graph records the launches once and replays them all with one call.
Four kinds of step are recorded: a plain decode step ([B, 1] -> logits), a speculative verify step ([B, K+1] ->
hidden states and logits), one MTP module's forward over its pairs (`mtp`), and for greedy speculation the
verify, the accept rule and the whole chain of MTP modules fused (`speculate`), so that one replay and one read
back make a whole speculative step. A graph fixes every shape and address, so a recorded step differs from the
eager one in three ways:
- the batch is padded up to a bucket (1, 2, 4, 8, ... max_batch); padding rows write their latents into a scratch
  slot past the engine's own and their outputs are ignored;
- attention reads a fixed span of keys (the next power of two >= the furthest position, at least 64) and the
  cache's usual rule (a key is visible iff its position is <= the query's) hides the rest;
- inputs are copied into the recorded input buffers before each replay.
One graph per (step, bucket, span, tokens per row), recorded the first time it is needed; all share one memory
pool, so what a call returns is valid until the next call. The same padded fixed-span steps run unrecorded on
the CPU (`record=False`), which is how the tests check them.
"""

from __future__ import annotations

import warnings

import torch

from nanoseek.infer.cache import LatentCache
from nanoseek.infer.drafting import mtp_chain
from nanoseek.model.transformer import DeepseekV3ForCausalLM

MIN_SPAN = 64


class DecodeGraphs:
    """Recorded `decode`, `verify`, `mtp` and `speculate` steps over an engine's cache, for `num_drafts` drafts per
    speculative step. The cache needs one slot more than `max_batch`: the last one is the padding rows' scratch."""

    def __init__(self, model: DeepseekV3ForCausalLM, cache: LatentCache, max_batch: int, num_drafts: int,
                 record: bool):
        self.model, self.cache, self.max_batch, self.record = model, cache, max_batch, record
        self.num_drafts = num_drafts
        self.scratch = cache.latent.shape[1] - 1
        if self.scratch < max_batch:
            raise ValueError(f"the cache needs max_batch + 1 = {max_batch + 1} slots for recorded decoding, "
                             f"it has {self.scratch + 1}")
        dev = cache.latent.device
        # The recorded graphs read their inputs from here: token, position, slot and (speculate) how many drafts
        # may be followed by a further token, for every row. The longest input is the last module's pairs in a
        # decode step: K + 1 new ones and K - 1 redone.
        width = max(2 * num_drafts, 1)
        self.ids = torch.zeros(4, max_batch, width, dtype=torch.long, device=dev)
        D, dtype = model.config.hidden_size, next(model.parameters()).dtype
        self.hidden = torch.zeros(max_batch, width, D, dtype=dtype, device=dev)
        self.graphs: dict[tuple[str, int, int, int], tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]] = {}
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

    def verify(self, tokens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[pending token, d_1..d_K] per row (slots 0..B-1) -> (hidden states [B, K+1, D]; logits [B, K+1, V];
        argmax [B, K+1])."""
        return self._run("verify", tokens, positions, list(range(len(tokens))))

    def mtp(self, module: int, hidden: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
            slots: torch.Tensor, only: torch.Tensor | None) -> torch.Tensor:
        """MTP module `module` over (hidden state, next token) pairs [B, T], rows in any `slots` -> its output
        (the last module: only each row's at index only[b], see `mtp_chain`)."""
        self.hidden[: len(tokens), : tokens.shape[1]].copy_(hidden)
        return self._run(f"mtp{module}", tokens, positions, slots, only)[0]

    def speculate(self, tokens: list[list[int]], starts: list[int], limits: list[int]) -> list[list[int]]:
        """A whole greedy speculative step for rows in slots 0..B-1: verify [pending token, d_1..d_K] at
        positions start..start+K, accept drafts while each is the argmax (at most `limits[b]` of them followed by
        a further token), run the MTP chain over the new pairs. -> per row [the K+1 argmaxes, the next K drafts]."""
        K = self.num_drafts
        positions = [[p + i for i in range(K + 1)] for p in starts]
        flags = [[limit] * (K + 1) for limit in limits]
        return self._run("speculate", tokens, positions, list(range(len(tokens))), flags)[0].tolist()

    # ------------------------------------------------------------------------------------------ recording
    def _run(self, kind: str, tokens, positions, slots, flags=None) -> tuple[torch.Tensor, ...]:
        """Stage the inputs (host lists: one copy; device tensors, as the MTP chain passes: a few) and replay.
        `flags`: one more number per row (speculate: its limit; the last MTP module: the index of its output)."""
        B, T = len(tokens), len(tokens[0])
        padded = self.bucket(B)
        ids = self.ids[:, :padded, :T]
        if isinstance(tokens, torch.Tensor):
            span = self.span(int(positions.max()) + 1)
            slots = torch.as_tensor(slots, device=ids.device)
            ids[:, B:] = 0
            ids[2, B:] = self.scratch
            ids[0, :B], ids[1, :B], ids[2, :B] = tokens, positions, slots[:, None]
            ids[3, :B] = 0 if flags is None else flags[:, None]
        else:
            span = self.span(max(max(p) for p in positions) + 1)
            pad = padded - B
            ids.copy_(torch.tensor([tokens + [[0] * T] * pad, positions + [[0] * T] * pad,
                                    [[s] * T for s in slots] + [[self.scratch] * T] * pad,
                                    (flags or [[0] * T] * B) + [[0] * T] * pad]))
        key = (kind, padded, span, T)
        if self.record and key not in self.graphs:
            try:
                self.graphs[key] = self._record(kind, padded, span, T)
            except RuntimeError as e:  # an op that cannot be recorded: decode eagerly from now on, still correct
                warnings.warn(f"CUDA graphs are off for this engine, recording a decode step failed: {e}")
                self.record = False
        if not self.record:
            outs = self._step(kind, padded, span, T)
        else:
            graph, outs = self.graphs[key]
            graph.replay()
        return tuple(o[:B] for o in outs)

    def _step(self, kind: str, padded: int, span: int, T: int) -> tuple[torch.Tensor, ...]:
        tokens, positions, slots = self.ids[0, :padded, :T], self.ids[1, :padded, :T], self.ids[2, :padded, 0]
        if kind == "speculate":
            return (self._speculate(tokens, positions, slots, self.ids[3, :padded, 0], span),)
        if kind.startswith("mtp"):  # rows in any slots: the cache gathers them
            cache = self.cache.bind_fixed(slots, positions, span, view=False)
            m = int(kind[3:])
            only = self.ids[3, :padded, 0] if m + 1 == self.num_drafts else None
            return (self.model.mtp_hidden(m, self.hidden[:padded, :T], tokens, positions, cache, False, only),)
        h = self.model.hidden_states(tokens, positions, self.cache.bind_fixed(slots, positions, span), prefill=False)
        if kind == "decode":
            logits = self.model.lm_head(h[:, 0]).float()
            return logits, logits.argmax(dim=-1)
        logits = self.model.lm_head(h).float()
        return h, logits, logits.argmax(dim=-1)

    def _speculate(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, limits: torch.Tensor,
                   span: int) -> torch.Tensor:
        """The engine's greedy speculative step (`Engine._decode_speculative`) with no host in between."""
        model, K = self.model, self.num_drafts
        h = model.hidden_states(tokens, positions, self.cache.bind_fixed(slots, positions, span), prefill=False)
        top = model.lm_head(h).float().argmax(dim=-1)  # [B, K+1]
        accepted = (tokens[:, 1:] == top[:, :K]).long().cumprod(dim=1).sum(dim=1)  # leading drafts that match
        emitted = 1 + torch.minimum(accepted, limits)
        # module 0's new pairs: (h_i, the token emitted after it) for each emitted token, the last repeated
        idx = torch.minimum(torch.arange(K + 1, device=h.device)[None], (emitted - 1)[:, None])
        pairs = h.gather(1, idx[..., None].expand(-1, -1, h.shape[-1])), top.gather(1, idx), positions.gather(1, idx)
        forward = lambda m, x, t, p, only: model.mtp_hidden(m, x, t, p, self.cache.bind_fixed(slots, p, span), False,
                                                            only)
        drafts = mtp_chain(model, self.cache, K, *pairs, emitted - 1, slots, False, forward,
                           lambda m, logits: logits.argmax(dim=-1))
        return torch.cat((top, drafts), dim=1)

    def _record(self, kind: str, padded: int, span: int, T: int
                ) -> tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]:
        # One eager run first, on a side stream as torch asks: lazy initialisation (cuBLAS handles, autotuning)
        # must not happen while recording. It performs this very step, which the first replay repeats: the same
        # cache writes, and the kept hidden states are put back so that the replay reads what the warm-up read.
        kept = None if self.cache.hidden is None else self.cache.hidden.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._step(kind, padded, span, T)
        torch.cuda.current_stream().wait_stream(side)
        if kept is not None:
            self.cache.hidden.copy_(kept)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outs = self._step(kind, padded, span, T)
        return graph, outs
