"""The inference engine: continuous batching over the latent cache, sampling, MTP speculation, thinking budgets.

One `Engine` owns a model and a `LatentCache` with `max_batch` slots. Requests wait in a queue; each `step()`
1. admits waiting requests into free slots and prefills them (right-padded forwards of prompts of similar
   length, full attention; identical prompts run once and the others copy its cache), and
2. decodes every request that was already running with one forward over [B, 1] (absorbed attention over the
   cache, each row at its own position), or [B, K+1] when speculating: the pending token plus K MTP drafts.
   On a GPU these forwards replay CUDA graphs recorded once per batch bucket and key span (graphs.py).
Finished requests leave at once and free their slot for the next step; the request in the highest slot moves
into it, so the running batch always holds slots 0..n-1 and attention reads the cache as a view, not a copy.
Everything rests on the cache's rule that a key is visible iff its position is <= the query's: padding, rejected
drafts and a freed slot's old contents are simply overwritten later and never need clearing.

Speculation (`speculative=True`), MTP modules drafting and the model verifying, is in speculative.py.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from nanoseek.checkpoint import load_model, resolve_model_dir
from nanoseek.infer.cache import LatentCache
from nanoseek.infer.graphs import DecodeGraphs
from nanoseek.infer.reasoning import split_reasoning, think_left_open
from nanoseek.infer.sampling import SamplingParams, penalise_rows, probs_for, sample, uniforms
from nanoseek.infer.speculative import Speculation
from nanoseek.model.transformer import DeepseekV3ForCausalLM

# Prefill forwards hold at most this many (padded) tokens, and a prompt joins a forward only if it is at least
# PREFILL_FILL of the longest prompt there: 64 mixed-length prompts padded to the longest wasted over half the
# prefill work (measured); grouped by length it wastes at most a tenth, for a few more small forwards.
PREFILL_TOKENS, PREFILL_FILL = 8192, 0.9


@dataclass
class Request:
    """A prompt (text, token ids, or chat messages) and how to decode it. `chat=True` applies the chat template
    to a text prompt (as one user message) or to a list of {"role", "content"} messages."""

    prompt: str | list[int] | list[dict]
    params: SamplingParams = field(default_factory=SamplingParams)
    chat: bool = False
    request_id: str | None = None


@dataclass
class Output:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens, including a final stop token (EOS / stop_token_ids) if one ended it
    text: str  # decoded without control tokens, cut before any stop string; "" without a tokenizer
    reasoning: str
    answer: str
    finish_reason: str  # "stop" or "length"
    logprobs: list[float] | None = None  # log p(token) under the model's raw distribution, one per token
    top_logprobs: list[dict[int, float]] | None = None
    num_drafted: int = 0
    num_accepted: int = 0

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / self.num_drafted if self.num_drafted else 0.0


@dataclass
class Event:
    """What one `step()` did for one request: its new tokens, the new text, and whether it is done."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None = None
    output: Output | None = None  # set when finished


class _Seq:
    """A request in flight: its slot in the cache, what it has produced, and the state that decides the next token."""

    def __init__(self, rid: str, prompt: list[int], params: SamplingParams, think_open: bool):
        self.id, self.prompt, self.params = rid, prompt, params
        self.out: list[int] = []
        self.slot = -1
        self.n_cached = 0  # tokens of this sequence in the cache (positions 0..n_cached-1)
        self.forced: deque[int] = deque()  # tokens to emit next whatever the logits say ("Wait", "</think>")
        self.think_open_at_start = self.in_think = think_open
        self.think_tokens = 0
        self.gen: torch.Generator | None = None
        if params.temperature > 0:
            self.gen = torch.Generator()
            self.gen.manual_seed(params.seed) if params.seed is not None else self.gen.seed()
        self.seen: torch.Tensor | None = None  # [V] bool, only with a repetition penalty
        self.logprobs: list[float] | None = [] if params.logprobs or params.top_logprobs else None
        self.top_logprobs: list[dict[int, float]] | None = [] if params.top_logprobs else None
        self.text, self.emitted, self.p_off, self.r_off = "", 0, 0, 0
        self.new: list[int] = []  # tokens produced in the current step
        self.finish_reason: str | None = None
        # speculation state: the drafts for positions n+1..n+K (with their distributions when sampling)
        self.drafts: list[int] = []
        self.draft_qs: list[torch.Tensor] = []
        self.drafted = self.accepted = 0


class Engine(Speculation):
    """Generation for a `DeepseekV3ForCausalLM`: `generate` for batches, `add_request`/`step`/`abort` for servers."""

    def __init__(self, model_or_path: DeepseekV3ForCausalLM | str | Path, dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None, max_batch: int = 16, max_len: int | None = None,
                 tokenizer=None, cuda_graphs: bool | None = None, compile: bool = False,
                 draft_tokens: int | None = None):
        if isinstance(model_or_path, (str, Path)):
            directory = resolve_model_dir(model_or_path)
            model = load_model(directory, dtype=dtype, device=device)
            if tokenizer is None and (directory / "tokenizer.json").is_file():
                from nanoseek.tokenizer import Tokenizer

                tokenizer = Tokenizer.load(directory)
        else:
            model = model_or_path.to(device=device, dtype=dtype) if (device or dtype) else model_or_path
        if isinstance(tokenizer, (str, Path)):
            from nanoseek.tokenizer import Tokenizer

            tokenizer = Tokenizer.load(tokenizer)
        self.model, self.tokenizer, self.config = model.eval(), tokenizer, model.config
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        # The longest sequence (prompt + output) a request may reach.
        self.max_len = min(max_len or self.config.max_position_embeddings, self.config.max_position_embeddings)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        # Tokens drafted per speculative step: one per MTP module, unless fewer are asked for.
        modules = len(model.mtp_modules)
        self.draft_tokens = modules if draft_tokens is None else draft_tokens
        if modules and not 1 <= self.draft_tokens <= modules:
            raise ValueError(f"draft_tokens must be between 1 and {modules} (the checkpoint's MTP modules), "
                             f"got {draft_tokens}")
        # Decode steps replay CUDA graphs on a GPU (see graphs.py); `cuda_graphs=True` on the CPU runs the same
        # padded fixed-shape steps unrecorded (for tests). They need one scratch slot past the engine's own.
        use_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        # +K positions: a speculative verify writes its drafts up to K positions past the last token it may keep.
        self.cache = LatentCache(self.config, max_batch + int(use_graphs), self.max_len + max(self.draft_tokens, 1),
                                 dtype=self.dtype, device=self.device)
        self.graphs = (DecodeGraphs(model, self.cache, max_batch, max(self.draft_tokens, 1),
                                    record=self.device.type == "cuda") if use_graphs else None)
        if compile:  # torch.compile each layer of this model (in place): fused kernels, after a compile per shape
            for layer in model.model.layers:
                layer.compile()
        self.has_mtp = len(model.mtp_modules) > 0
        self.vocab_size = self.config.vocab_size
        tok = tokenizer
        self.eos_id = tok.eos_id if tok is not None else self.config.eos_token_id
        self.think_id = tok.think_id if tok is not None else None
        self.end_think_id = tok.end_think_id if tok is not None else None
        self.wait_ids = tok.encode("Wait") if tok is not None else []
        self.waiting: deque[_Seq] = deque()
        self.running: list[_Seq] = []  # running[i] is the request in cache slot i
        self._ids = itertools.count()

    @property
    def cache_bytes_per_token(self) -> int:
        """(kv_lora_rank + qk_rope_head_dim) x layers x element size: the main model's latent cache per token."""
        return LatentCache.bytes_per_token(self.config, self.dtype)

    # ------------------------------------------------------------------------------------------ requests
    def _encode(self, prompt, chat: bool) -> list[int]:
        if isinstance(prompt, str) or (chat and isinstance(prompt, list) and prompt and isinstance(prompt[0], dict)):
            if self.tokenizer is None:
                raise ValueError("this model directory has no tokenizer (tokenizer.json), so prompts must be lists "
                                 "of token ids, not text")
            if chat:
                messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
                return self.tokenizer.render_chat_ids(messages)
            return self.tokenizer.encode(prompt, add_bos=True)
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            raise ValueError("chat messages need chat=True")
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) for t in prompt):
            raise ValueError(f"a prompt must be text, a list of token ids or chat messages, got {type(prompt).__name__}")
        return list(prompt)

    def add_request(self, request: Request | str | list[int] | list[dict], *, chat: bool = False, **params) -> str:
        """Queue a request (a `Request`, or a prompt plus `SamplingParams` fields as keywords); it joins the running
        batch at the next `step()` that finds a free slot. Returns its id."""
        if not isinstance(request, Request):
            request = Request(request, SamplingParams(**params), chat=chat)
        p = request.params.validate()
        ids = self._encode(request.prompt, request.chat)
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        if max(ids) >= self.vocab_size or min(ids) < 0:
            raise ValueError(f"prompt token ids must lie in [0, {self.vocab_size}), got {min(ids)}..{max(ids)}")
        if len(ids) >= self.max_len:
            raise ValueError(f"the prompt has {len(ids)} tokens but the context holds {self.max_len} "
                             f"(max_position_embeddings={self.config.max_position_embeddings}, max_len={self.max_len}); "
                             f"shorten the prompt or raise max_len")
        if (p.thinking_budget is not None or p.min_thinking_tokens) and self.tokenizer is None:
            raise ValueError("thinking budgets need a tokenizer (for <think>, </think> and 'Wait'); this model has none")
        think_open = self.think_id is not None and think_left_open(ids, self.think_id, self.end_think_id)
        rid = request.request_id or f"req-{next(self._ids)}"
        seq = _Seq(rid, ids, p, think_open)
        if p.repetition_penalty != 1.0:
            seq.seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
            seq.seen[torch.tensor(ids, device=self.device)] = True
        self.waiting.append(seq)
        return rid

    def abort(self, request_id: str) -> bool:
        """Drop a request, waiting or running; its slot is free for the next step. True if it was found."""
        for s in list(self.waiting):
            if s.id == request_id:
                self.waiting.remove(s)
                return True
        for s in self.running:
            if s.id == request_id:
                self._release(s)
                return True
        return False

    @property
    def free_slots(self) -> list[int]:
        return list(range(len(self.running), self.max_batch))

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------------------------------ the loop
    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Admit and prefill waiting requests, decode the running ones by one step; report what happened."""
        decoding = list(self.running)  # rows in slot order: one view of the cache
        admitted = []
        while self.waiting and len(self.running) < self.max_batch:
            s = self.waiting.popleft()
            s.slot = len(self.running)
            self.running.append(s)
            admitted.append(s)
        if decoding:
            if self.has_mtp and any(s.params.speculative for s in decoding):
                self._decode_speculative(decoding)
            else:
                self._decode(decoding)
        for group in _by_length(admitted):
            self._prefill(group)
        events = []
        for s in decoding + admitted:
            done = s.finish_reason is not None
            limit = len(s.text) if done else len(s.text) - max((len(x) for x in s.params.stop), default=1) + 1
            delta = s.text[s.emitted:max(limit, s.emitted)]
            s.emitted += len(delta)
            if s.new or delta or done:
                events.append(Event(s.id, s.new, delta, done, s.finish_reason, self._output(s) if done else None))
            s.new = []
            if done:
                self._release(s)
        return events

    def _release(self, s: _Seq) -> None:
        """Free s's slot; the request in the highest slot moves into it (its cached tokens are copied)."""
        last = self.running.pop()
        if last is not s:
            self.cache.move(last.slot, s.slot, last.n_cached)
            last.slot = s.slot
            self.running[s.slot] = last

    def generate(self, prompts: Sequence[str | list[int] | list[dict]], max_tokens: int = 256, *, chat: bool = False,
                 progress: bool = False, **params) -> list[Output]:
        """Generate for every prompt (text, token ids, or with chat=True text/messages); outputs in prompt order.
        Keyword arguments are `SamplingParams` fields; a seed is offset by the prompt's index so a batch of equal
        prompts gives different samples that still reproduce."""
        if not prompts:
            raise ValueError("the prompt list is empty: give at least one prompt")
        base = SamplingParams(max_tokens=max_tokens, **params).validate()
        ids = []
        for i, prompt in enumerate(prompts):
            p = SamplingParams(**{**vars(base), "seed": None if base.seed is None else base.seed + i})
            ids.append(self.add_request(Request(prompt, p, chat=chat)))
        results: dict[str, Output] = {}
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="generate", unit="prompt")
        wanted = set(ids)
        while wanted - results.keys():
            for e in self.step():
                if e.finished and e.request_id in wanted:
                    results[e.request_id] = e.output
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [results[i] for i in ids]

    def generate_mixed(self, prompts: Sequence[tuple[str | list[int] | list[dict], bool]], max_tokens: int = 256,
                       **kwargs) -> list[Output]:
        """`generate` for (prompt, chat) pairs, as a prompts file may mix plain and chat prompts: each kind runs as
        one batch, and the outputs come back in the pairs' order."""
        outputs: list = [None] * len(prompts)
        for chat in (False, True):
            idx = [i for i, (_, c) in enumerate(prompts) if c == chat]
            if idx:
                for i, o in zip(idx, self.generate([prompts[i][0] for i in idx], max_tokens, chat=chat, **kwargs)):
                    outputs[i] = o
        return outputs

    def stream(self, prompt: str | list[int] | list[dict], max_tokens: int = 256, *, chat: bool = False,
               **params) -> Iterator[str]:
        """Yield text deltas as they are produced; closing the generator early aborts the request."""
        rid = self.add_request(Request(prompt, SamplingParams(max_tokens=max_tokens, **params), chat=chat))
        self.last_output: Output | None = None
        done = False
        try:
            while not done:
                for e in self.step():
                    if e.request_id == rid:
                        if e.text:
                            yield e.text
                        if e.finished:
                            self.last_output, done = e.output, True
        finally:
            if not done:
                self.abort(rid)

    # ------------------------------------------------------------------------------------------ forwards
    def _slots(self, seqs: list[_Seq]) -> torch.Tensor:
        return torch.tensor([s.slot for s in seqs], device=self.device)

    def _prefill(self, seqs: list[_Seq]) -> None:
        """Full attention over each new prompt (right-padded to a common length) and the first token. Identical
        prompts (G samples of one prompt, as GRPO and pass@k ask for) run once; the others copy its cache."""
        first: dict[tuple[int, ...], int] = {}
        which = [first.setdefault(tuple(s.prompt), len(first)) for s in seqs]
        unique = [seqs[which.index(u)] for u in range(len(first))]
        T = max(len(s.prompt) for s in seqs)
        ids = torch.zeros(len(unique), T, dtype=torch.long)
        for b, s in enumerate(unique):
            ids[b, : len(s.prompt)] = torch.tensor(s.prompt)
        ids = ids.to(self.device)
        pos = torch.arange(T, device=self.device).expand(len(unique), T)
        h = self.model.hidden_states(ids, pos, self.cache.bind(self._slots(unique), pos), prefill=True)
        for s, u in zip(seqs, which):
            if s is not unique[u]:
                self.cache.move(unique[u].slot, s.slot, len(s.prompt))
        rows = torch.tensor(which, device=self.device)  # each request's row of the forward
        last = torch.tensor([len(s.prompt) - 1 for s in seqs], device=self.device)
        logits = self.model.lm_head(h[rows, last]).float()
        tokens = self._choose(seqs, logits)
        for b, s in enumerate(seqs):
            s.n_cached = len(s.prompt)
            self._append(s, tokens[b], logits, b)
        spec = [b for b, s in enumerate(seqs) if s.params.speculative and self.has_mtp and s.finish_reason is None]
        if spec:  # module 0 over positions 0..P-1: (h_i, t_{i+1}), the last pair using the token just chosen
            idx = torch.tensor(spec, device=self.device)
            r = rows[idx]
            nxt = torch.cat([ids[r, 1:], ids.new_zeros(len(spec), 1)], dim=1)
            nxt[torch.arange(len(spec), device=self.device), last[idx]] = torch.tensor(
                [tokens[b] for b in spec], device=self.device)
            self._draft([seqs[b] for b in spec], h[r], nxt, pos[:1].expand(len(spec), T),
                        [len(seqs[b].prompt) for b in spec], prefill=True)

    def _decode(self, seqs: list[_Seq]) -> None:
        """One token for every row: a [B, 1] forward over the cache, each row at its own position."""
        greedy = self._greedy(seqs)
        if self.graphs is not None:
            logits, top = self.graphs.decode([s.out[-1] for s in seqs], [s.n_cached for s in seqs])
        else:
            tokens = torch.tensor([[s.out[-1]] for s in seqs], device=self.device)
            pos = torch.tensor([[s.n_cached] for s in seqs], device=self.device)
            logits = self.model(tokens, pos, self.cache.bind(self._slots(seqs), pos), prefill=False)[:, 0].float()
            top = logits.argmax(dim=-1) if greedy else None
        chosen = self._choose(seqs, logits, picked=top.tolist() if greedy else None)
        for b, (s, t) in enumerate(zip(seqs, chosen)):
            self._emit(s, t, logits, b)

    # ------------------------------------------------------------------------------------------ choosing tokens
    def _penalise(self, seqs: list[_Seq], logits: torch.Tensor) -> torch.Tensor:
        return penalise_rows(logits, [s.seen for s in seqs], [s.params.repetition_penalty for s in seqs])

    def _choose(self, seqs: list[_Seq], logits: torch.Tensor, u: torch.Tensor | None = None, raw: bool = False,
                picked: list[int] | None = None) -> list[int]:
        """One token per row from its logits [B, V]: forced tokens, then greedy or sampled, then the "Wait" rule.
        `raw`: no rules (the caller checked that none is due). `picked`: the rows' argmaxes, already read back
        (greedy rows without a penalty), so only the rules remain to apply."""
        if picked is None:
            proc = self._penalise(seqs, logits)
            out = proc.argmax(dim=-1)
            sampled = [b for b, s in enumerate(seqs) if s.params.temperature > 0]
            if sampled:
                if u is None:
                    u = uniforms([s.gen for s in seqs], 1)[:, 0].to(logits.device)
                r = torch.tensor(sampled, device=logits.device)
                out[r] = sample(probs_for(proc[r], [seqs[b].params for b in sampled]), u[r])
        chosen = out.tolist() if picked is None else list(picked)
        if raw:
            return chosen
        for b, s in enumerate(seqs):
            rule = self._rule(s)
            if rule == "force":
                chosen[b] = s.forced.popleft() if s.forced else self.end_think_id
            elif rule == "wait" and chosen[b] in (self.end_think_id, self.eos_id):
                chosen[b] = self.wait_ids[0]
                s.forced.extend(self.wait_ids[1:])
        return chosen

    def _rule(self, s: _Seq, extra: Sequence[int] = ()) -> str | None:
        """Which thinking-budget rule governs this row's next token: "force" (a queued or forced token),
        "wait" (stopping now would end thinking too early) or None. `extra`: as if those tokens were appended."""
        if s.forced:
            return "force"
        p = s.params
        if p.thinking_budget is None and not p.min_thinking_tokens:
            return None
        in_think, count = s.in_think, s.think_tokens
        for token in extra:
            if token == self.think_id:
                in_think = True
            elif token == self.end_think_id:
                in_think = False
            elif in_think:
                count += 1
        if not in_think:
            return None
        if p.thinking_budget is not None and count >= p.thinking_budget:
            return "force"
        if p.min_thinking_tokens and count < p.min_thinking_tokens:
            return "wait"
        return None

    # ------------------------------------------------------------------------------------------ bookkeeping
    @staticmethod
    def _greedy(seqs: list[_Seq]) -> bool:
        """Every row takes its argmax (temperature 0, no repetition penalty), so the argmaxes decide."""
        return all(s.params.temperature == 0 and s.seen is None for s in seqs)

    def _append(self, s: _Seq, token: int, logits: torch.Tensor, *row: int) -> None:
        """Record a token chosen from `logits[row]` (raw logits): think state, logprobs, text and stop checks.
        (The row is only indexed when logprobs are wanted: a view per row per step costs on a GPU.)"""
        s.out.append(token)
        s.new.append(token)
        if token == self.think_id:
            s.in_think = True
        elif token == self.end_think_id:
            s.in_think = False
        elif s.in_think:
            s.think_tokens += 1
        if s.seen is not None:
            s.seen[token] = True
        if s.logprobs is not None:
            lp = logits[row].float().log_softmax(dim=-1)
            s.logprobs.append(float(lp[token]))
            if s.top_logprobs is not None:
                v, i = lp.topk(min(s.params.top_logprobs, lp.numel()))
                s.top_logprobs.append(dict(zip(i.tolist(), v.tolist())))
        p = s.params
        if (token == self.eos_id and not p.ignore_eos) or token in p.stop_token_ids:
            s.finish_reason = "stop"
            return
        if self.tokenizer is not None:
            self._detokenize(s)
            for stop in p.stop:
                at = s.text.find(stop)
                if at >= 0:
                    s.text = s.text[:at]
                    s.finish_reason = "stop"
                    return
        if len(s.out) >= p.max_tokens or len(s.prompt) + len(s.out) >= self.max_len:
            s.finish_reason = "length"

    def _detokenize(self, s: _Seq) -> None:
        """Incremental decoding: decode a short window and keep only the new characters, holding back a partial
        UTF-8 character (shown as U+FFFD) until its remaining bytes arrive."""
        tok = self.tokenizer
        prefix = tok.decode(s.out[s.p_off:s.r_off], skip_special=True)
        full = tok.decode(s.out[s.p_off:], skip_special=True)
        if full.endswith("\ufffd"):
            return
        s.text += full[len(prefix):]
        s.p_off, s.r_off = s.r_off, len(s.out)

    def _output(self, s: _Seq) -> Output:
        reasoning, answer = split_reasoning(s.text, s.think_open_at_start) if self.tokenizer else ("", "")
        return Output(s.id, s.prompt, list(s.out), s.text, reasoning, answer, s.finish_reason, s.logprobs,
                      s.top_logprobs, s.drafted, s.accepted)


def _by_length(seqs: list[_Seq]) -> list[list[_Seq]]:
    """Prefill groups: longest prompts first, each group within PREFILL_FILL of its longest and PREFILL_TOKENS."""
    groups: list[list[_Seq]] = []
    for s in sorted(seqs, key=lambda s: len(s.prompt), reverse=True):
        longest = len(groups[-1][0].prompt) if groups else 0
        if not groups or len(s.prompt) < PREFILL_FILL * longest or (len(groups[-1]) + 1) * longest > PREFILL_TOKENS:
            groups.append([])
        groups[-1].append(s)
    return groups
