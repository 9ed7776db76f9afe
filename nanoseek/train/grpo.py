"""GRPO (DeepSeekMath / R1) and its variants (Dr. GRPO, DAPO, BNPO) on the one training loop.

One optimizer step = one pass over a rollout batch: P prompts x G samples drawn from the LIVE policy with the
engine, scored by a verifier (or any reward callable), turned into group-relative advantages. The loop asks
`RolloutBatches` for micro-batches; it generates a fresh rollout batch every `num_iterations` passes, so each
rollout is optimised on several times (the clipped ratio then matters; with one pass the ratio is exactly 1).

Per token, with ratio r = exp(logp - logp_old) and the sequence's advantage A:

    loss_t = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + beta * k3,   k3 = exp(ref - logp) - (ref - logp) - 1

aggregated over the completion tokens as
    grpo      mean over each sequence's tokens, then mean over sequences (DeepSeekMath's 1/|o_i|)
    bnpo      sum over all tokens of the micro-batch / their count
    dapo      sum over all tokens of the rollout batch / their count (token-level; TRL's default)
    dr_grpo   sum over all tokens / (sequences x max_new_tokens): a constant, so no length bias (Dr. GRPO)

Old log-probs cost nothing: the first pass over a rollout runs the policy that sampled it, so its detached
log-probs ARE the old ones; they are stored for the later passes. The reference model (beta > 0 only) scores
each rollout once, without gradients.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from nanoseek.checkpoint import load_model, resolve_model_dir, save_model
from nanoseek.data.sources import read_jsonl_rows
from nanoseek.data.tasks import Problem, RewardConfig, extract_answer, get_task, is_well_formed
from nanoseek.model.transformer import DeepseekV3ForCausalLM
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.completions import MicroBatch, right_padded, token_logps
from nanoseek.train.loop import Trainer, TrainConfig, peak_precision
from nanoseek.train.run import prepare_run

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
SCALE_REWARDS = ("group", "batch", "none")
OVERLONG = ("none", "mask", "penalty")
RewardFn = Callable[..., list]

# Small-model RL defaults: constant LR (no schedule to tune), no weight decay pulling weights back to zero, and
# the routing bias frozen (bias_freeze_frac 0): the balancing bias is a pretraining device, and moved by the loads
# of a few dozen rollouts per step it would reroute tokens regardless of reward. lr 1e-5, measured on `tiny`
# (benchmarks/RESULTS.md): 1e-4 cut held-out pass@1 from 0.27 to 0.11-0.16 within five steps; in the speedrun,
# 3e-5 raised sampled pass@1 (0.47 -> 0.55 at temperature 1) but cost 8 points of greedy pass@1, while 1e-5
# raised sampled pass@1 as much (0.55) and left greedy where it was (0.80).
TRAIN_DEFAULTS = {"lr": 1e-5, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0, "batch_size": 16,
                  "eval_every": 10, "checkpoint_every": 50, "seq_len": 512, "bias_freeze_frac": 0.0}


@dataclass
class GRPOConfig:
    task: str | None = None  # prompts (train split) and the verifier
    data: str | None = None  # or a JSONL of {"prompt", ...} rows; other fields reach the reward as columns
    difficulty: str | None = None  # "4" or "3,4" (a mix); default: the task's
    reward: str | None = None  # "module:function" (prompts, completions, **columns) -> list[float]
    format_weight: float = 0.0  # task verifier: extra reward for a well-formed completion (R1: equal weight)
    group_size: int = 8
    prompts_per_step: int = 8
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = 0.0  # KL weight; 0 keeps no reference model
    loss_type: str = "dapo"
    epsilon: float = 0.2
    epsilon_high: float | None = None  # DAPO clip-higher (0.28); None = epsilon
    num_iterations: int = 1  # optimizer passes per rollout batch
    scale_rewards: str | None = None  # group | batch | none; None: "none" for dr_grpo, else "group"
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal, sample more prompts instead
    max_sampling_rounds: int = 4  # cap on generation rounds per rollout batch with dynamic sampling
    overlong: str = "none"  # truncated completions: "mask" them out of the loss, or a DAPO soft "penalty"
    overlong_buffer: int | None = None  # penalty ramps 0 -> -1 over the last this-many tokens (default max/4)
    eval_num: int = 64  # held-out problems for the periodic greedy pass@1 (0 = off)
    eval_difficulty: str | None = None  # default: difficulty
    eval_samples: int = 0  # > 0: also R1's sampled pass@1 (temperature 0.6, top-p 0.95, this many per problem)
    # Engine rows decoded together. Dynamic sampling's later rounds generate up to 4P x G sequences; on `tiny`
    # (CPU), 256 countdown samples took 8.1-9.0 s at 64 rows and 4.6-5.3 s at 128-256, and 500 greedy
    # evaluations 22 s at 64 rows and 12 s at 256.
    max_batch: int = 256
    seed: int = 0
    ignore_eos: bool = False  # benchmarks only: every completion runs to max_new_tokens

    def validate(self) -> "GRPOConfig":
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        need(bool(self.task) != bool(self.data), "give exactly one prompt source: --task NAME or --data FILE.jsonl")
        if self.task:
            get_task(self.task)
        need(self.group_size >= 2, f"--group-size must be >= 2 (advantages compare samples of one prompt), "
                                   f"got {self.group_size}")
        need(self.prompts_per_step >= 1, f"--prompts-per-step must be >= 1, got {self.prompts_per_step}")
        need(self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        need(self.temperature > 0, f"--temperature must be > 0 for RL sampling, got {self.temperature}")
        need(self.beta >= 0, f"--beta must be >= 0, got {self.beta}")
        need(self.loss_type in LOSS_TYPES, f"--loss-type {self.loss_type!r} is unknown; use {', '.join(LOSS_TYPES)}")
        need(self.epsilon > 0 and (self.epsilon_high is None or self.epsilon_high > 0), "--epsilon must be > 0")
        need(self.num_iterations >= 1, f"--num-iterations must be >= 1, got {self.num_iterations}")
        need(self.scale_rewards in (None, *SCALE_REWARDS),
             f"--scale-rewards {self.scale_rewards!r} is unknown; use group, batch or none")
        need(self.overlong in OVERLONG, f"--overlong {self.overlong!r} is unknown; use none, mask or penalty")
        need(self.max_sampling_rounds >= 1, "--max-sampling-rounds must be >= 1")
        need(self.eval_samples >= 0, f"--eval-samples must be >= 0, got {self.eval_samples}")
        need(self.max_batch >= 1, f"--max-batch must be >= 1, got {self.max_batch}")
        return self

    @property
    def scale(self) -> str:
        return self.scale_rewards or ("none" if self.loss_type == "dr_grpo" else "group")


# ============================================================================ the math (pure functions, tested)
def group_advantages(rewards: torch.Tensor, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """rewards [groups, G] -> advantages [groups, G]: reward minus its group's mean, divided by the group's std
    ("group", GRPO), by the whole batch's std ("batch") or by nothing ("none", Dr. GRPO). Unbiased std, as TRL."""
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "group":
        return centered / (rewards.std(dim=1, keepdim=True) + eps)
    if scale == "batch":
        return centered / (rewards.std() + eps)
    return centered


def overlong_penalty(length: int, max_len: int, buffer: int) -> float:
    """DAPO's soft overlong punishment: 0 up to max_len - buffer, then linear down to -1 at max_len."""
    start = max_len - buffer
    if length <= start or buffer <= 0:
        return 0.0
    return max(-1.0, (start - length) / buffer)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, *, loss_type: str = "dapo", epsilon: float = 0.2,
              epsilon_high: float | None = None, beta: float = 0.0, max_completion_length: int | None = None,
              num_sequences: float | None = None, num_tokens: float | None = None
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped surrogate + k3 KL, aggregated per `loss_type` (module docstring).

    logps, old_logps, ref_logps, mask: [N, T] per completion token; advantages [N]. `num_sequences` and
    `num_tokens` are the normalisers of the WHOLE rollout batch when this is one micro-batch of it (default:
    this batch's own), so that micro-batch losses average to the full-batch loss."""
    mask = mask.to(logps.dtype)
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    lo, hi = 1.0 - epsilon, 1.0 + (epsilon if epsilon_high is None else epsilon_high)
    adv = advantages[:, None].to(logps.dtype)
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, lo, hi) * adv)
    kl = None
    if beta > 0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs reference log-probs")
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1.0
        per_token = per_token + beta * kl
    n_seq = float(num_sequences if num_sequences is not None else logps.shape[0])
    n_tok = mask.sum()
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).sum() / n_seq
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / n_tok.clamp(min=1.0)
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() / max(float(num_tokens if num_tokens is not None else n_tok), 1.0)
    elif loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("dr_grpo needs max_completion_length (its constant normaliser)")
        loss = (per_token * mask).sum() / (n_seq * max_completion_length)
    else:
        raise ValueError(f"loss type {loss_type!r} is unknown; use {', '.join(LOSS_TYPES)}")
    with torch.no_grad():
        denom = n_tok.clamp(min=1.0)
        low = ((ratio < lo) & (adv < 0)).to(mask.dtype) * mask
        high = ((ratio > hi) & (adv > 0)).to(mask.dtype) * mask
        stats = {"clip_fraction_low": float(low.sum() / denom), "clip_fraction_high": float(high.sum() / denom),
                 "clip_fraction": float((low + high).sum() / denom),
                 "entropy": float(-(logps.detach() * mask).sum() / denom)}  # sample estimate of H
        if kl is not None:
            stats["kl"] = float((kl.detach() * mask).sum() / denom)
    return loss, stats


def select_groups(rewards: list[list[float]], needed: int) -> list[int]:
    """Dynamic sampling: indices of the groups whose rewards are not all equal (they carry signal), at most
    `needed` of them, in order."""
    return [i for i, r in enumerate(rewards) if max(r) - min(r) > 1e-9][:needed]


def load_reward_fn(spec: str) -> RewardFn:
    """`package.module:function` -> the callable; one clear error otherwise."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"--reward {spec!r} must look like module:function (e.g. my_rewards:length_reward)")
    try:
        fn = getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise ValueError(f"--reward: cannot import module {module!r} ({e}); is it on PYTHONPATH?") from None
    except AttributeError:
        raise ValueError(f"--reward: module {module!r} has no function {name!r}") from None
    if not callable(fn):
        raise ValueError(f"--reward: {spec} is not callable")
    return fn


# ============================================================================ prompts and rewards
class PromptSource:
    """Prompts with their columns, in a fixed (seeded) order: task train-split problems, or JSONL rows."""

    def __init__(self, cfg: GRPOConfig):
        from nanoseek.evaluate import parse_difficulties

        self.cfg = cfg
        self.task = get_task(cfg.task) if cfg.task else None
        self.levels = parse_difficulties(cfg.difficulty) or ([self.task.DEFAULT_DIFFICULTY] if self.task else [])
        self.rows: list[dict] = []
        if cfg.data:
            self.rows = _read_prompt_rows(cfg.data)

    def get(self, index: int) -> tuple[str, dict]:
        if self.task is not None:
            level = random.Random(f"grpo/{self.cfg.seed}/{index}").choice(self.levels)
            p = self.task.sample("train", self.cfg.seed * 1_000_003 + index, level)
            return self.task.prompt(p), {"problem": p.to_dict()}
        rows = self.rows
        order = random.Random(f"grpo/{self.cfg.seed}/epoch{index // len(rows)}").sample(range(len(rows)), len(rows))
        row = rows[order[index % len(rows)]]
        return row["prompt"], {k: v for k, v in row.items() if k != "prompt"}


def _read_prompt_rows(path: str) -> list[dict]:
    rows = []
    for n, row in read_jsonl_rows(path, "prompt file"):
        if not isinstance(row.get("prompt"), str):
            raise ValueError(f"{path} line {n} needs a \"prompt\" string field")
        rows.append(row)
    if not rows:
        raise ValueError(f"prompt file {path} holds no rows")
    return rows


def score_completions(cfg: GRPOConfig, task, reward_fn: RewardFn | None, prompts: list[str], texts: list[str],
                      columns: dict[str, list]) -> tuple[list[float], list[float], list[float]]:
    """(rewards, accuracy, format) per completion. The verifier judges accuracy whenever a task is known, so it is
    logged even when a custom callable gives the reward."""
    acc, fmt, verdicts = [], [], []
    reward_cfg = RewardConfig(format_weight=cfg.format_weight)
    for i, text in enumerate(texts):
        if task is not None:
            r = task.verify(Problem.from_dict(columns["problem"][i]), text, reward_cfg)
            verdicts.append(r.total)
            acc.append(r.accuracy)
            fmt.append(r.format)
        else:
            got, want = extract_answer(text), columns.get("answer", [None] * len(texts))[i]
            ok = float(got is not None and want is not None and got.strip() == str(want).strip())
            verdicts.append(ok)
            acc.append(ok)
            fmt.append(float(is_well_formed(text)))
    if reward_fn is None:
        return verdicts, acc, fmt
    out = reward_fn(prompts, texts, **columns)
    if not isinstance(out, (list, tuple)) or len(out) != len(texts):
        raise ValueError(f"the reward function returned {type(out).__name__} of length "
                         f"{len(out) if hasattr(out, '__len__') else '?'}; it must return one float per completion "
                         f"({len(texts)})")
    return [0.0 if r is None else float(r) for r in out], acc, fmt


# ============================================================================ rollouts as the loop's batches
class RolloutBatches:
    """An iterator of micro-batches for the Trainer. Holds the engine (sharing the live model), the reference model
    and the prompt source; a new rollout batch every `num_iterations` passes of `num_chunks` micro-batches."""

    def __init__(self, model: DeepseekV3ForCausalLM, tokenizer: Tokenizer, cfg: GRPOConfig, num_chunks: int,
                 ref_model: DeepseekV3ForCausalLM | None = None, reward_fn: RewardFn | None = None,
                 engine=None):
        from nanoseek.infer.engine import Engine

        self.model, self.tok, self.cfg, self.ref = model, tokenizer, cfg, ref_model
        self.source = PromptSource(cfg)
        self.reward_fn = reward_fn
        self.num_chunks = num_chunks
        max_len = min(model.config.max_position_embeddings, 256 + cfg.max_new_tokens)
        # The engine holds a reference to the live model (no copy): rollouts always come from the current weights.
        self.engine = engine or Engine(model, tokenizer=tokenizer, max_batch=cfg.max_batch, max_len=max_len)
        self.counter = 0  # prompts consumed
        self.rollouts = 0
        self.chunks: list[MicroBatch] = []
        self.position = 0  # micro-batches handed out from the current rollout
        self.rollout_tokens = 0  # prompt + generated tokens, for the receipt
        self.ref_tokens = 0

    # ------------------------------------------------------------------ iterator protocol + exact-enough resume
    def __iter__(self):
        return self

    def __next__(self) -> MicroBatch:
        if not self.chunks or self.position >= self.num_chunks * self.cfg.num_iterations:
            self.chunks = self.make_rollout()
            self.position = 0
        if self.position == self.num_chunks:  # a second pass over the same rollout: no new generation time
            for c in self.chunks:
                c.metrics = {**c.metrics, "rollout_seconds": 0.0}
        chunk = self.chunks[self.position % self.num_chunks]
        self.position += 1
        return chunk

    def state_dict(self) -> dict[str, Any]:
        # A resumed run starts a fresh rollout at the next unseen prompt (not a bit-exact replay of the old one).
        return {"counter": self.counter, "rollouts": self.rollouts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counter, self.rollouts = state["counter"], state["rollouts"]
        self.chunks, self.position = [], 0

    # ------------------------------------------------------------------ one rollout batch
    def sample_groups(self, n: int) -> tuple[list[str], list[dict], list[list]]:
        """n new prompts x G samples from the live policy: (prompts, columns per prompt, outputs per prompt)."""
        cfg, G = self.cfg, self.cfg.group_size
        items = [self.source.get(self.counter + i) for i in range(n)]
        self.counter += n
        chats = [[{"role": "user", "content": p}] for p, _ in items for _ in range(G)]
        was_training = self.model.training
        self.model.eval()  # generation runs the model in eval mode (no expert-load counting), then back
        try:
            outs = self.engine.generate(chats, max_tokens=cfg.max_new_tokens, chat=True, temperature=cfg.temperature,
                                        top_p=cfg.top_p, seed=cfg.seed * 7_919 + self.counter * G,
                                        ignore_eos=cfg.ignore_eos)
        finally:
            self.model.train(was_training)
        self.rollout_tokens += sum(o.prompt_tokens + len(o.token_ids) for o in outs)
        return [p for p, _ in items], [c for _, c in items], [outs[i * G:(i + 1) * G] for i in range(n)]

    def make_rollout(self) -> list[MicroBatch]:
        cfg, P = self.cfg, self.cfg.prompts_per_step
        t0 = time.perf_counter()
        kept: list[tuple] = []  # (prompt, columns, outputs, rewards, acc, fmt)
        spare: list[tuple] = []  # uniform groups, used only if dynamic sampling runs out of rounds
        generated = zero_std = rounds = 0
        need = P
        while need > 0 and rounds < (cfg.max_sampling_rounds if cfg.dynamic_sampling else 1):
            rate = len(kept) / generated if generated else 1.0
            n = need if rounds == 0 else min(4 * P, math.ceil(need / max(rate, 0.25)))  # oversample by keep rate
            prompts, cols, groups = self.sample_groups(n)
            rounds += 1
            generated += n
            scored = [self._score(p, c, outs) for p, c, outs in zip(prompts, cols, groups)]
            rewards = [s[0] for s in scored]
            informative = set(select_groups(rewards, len(rewards)))
            zero_std += len(rewards) - len(informative)
            for i, (p, c, outs) in enumerate(zip(prompts, cols, groups)):
                entry = (p, c, outs, *scored[i])
                (kept if (i in informative or not cfg.dynamic_sampling) else spare).append(entry)
            kept = kept[:P]
            need = P - len(kept)
        kept += spare[:need]  # out of rounds: fill with uniform groups (zero advantage; KL still applies)
        self.rollouts += 1
        chunks = self._tensorize(kept)
        seconds = time.perf_counter() - t0
        rewards = torch.tensor([r for e in kept for r in e[3]])
        outs = [o for e in kept for o in e[2]]
        metrics = {
            "reward": float(rewards.mean()), "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
            "accuracy": sum(a for e in kept for a in e[4]) / len(outs),
            "format_rate": sum(f for e in kept for f in e[5]) / len(outs),
            "response_length": sum(len(o.token_ids) for o in outs) / len(outs),
            "clipped_ratio": sum(o.finish_reason == "length" for o in outs) / len(outs),
            "frac_reward_zero_std": zero_std / generated, "sampling_rounds": rounds,
            "rollout_seconds": seconds, "rollout": self.rollouts}
        for c in chunks:
            c.metrics = metrics
        return chunks

    def _score(self, prompt: str, columns: dict, outs: list) -> tuple[list[float], list[float], list[float]]:
        cfg, G = self.cfg, len(outs)
        cols = {k: [v] * G for k, v in columns.items()}
        cols.update(completion_ids=[o.token_ids for o in outs], finish_reason=[o.finish_reason for o in outs],
                    sample=list(range(G)))
        rewards, acc, fmt = score_completions(cfg, self.source.task, self.reward_fn, [prompt] * G,
                                              [o.text for o in outs], cols)
        if cfg.overlong == "penalty":
            buffer = cfg.overlong_buffer if cfg.overlong_buffer is not None else max(1, cfg.max_new_tokens // 4)
            rewards = [r + overlong_penalty(len(o.token_ids), cfg.max_new_tokens, buffer)
                       for r, o in zip(rewards, outs)]
        return rewards, acc, fmt

    @torch.no_grad()
    def _tensorize(self, groups: list[tuple]) -> list[MicroBatch]:
        """The rollout as `num_chunks` micro-batches. Completions are sorted by length and each micro-batch is
        padded only to its own longest: padding everything to the rollout's longest made the update 1.5x slower
        on a countdown rollout (101 tokens on average, 174 at the longest). A micro-batch holds each of its
        distinct prompts once (see `token_logps`). The loss does not care which completions share a micro-batch:
        advantages are already per sequence and the normalisers are the whole rollout's."""
        cfg, pad = self.cfg, self.tok.pad_id
        device = next(self.model.parameters()).device
        adv = group_advantages(torch.tensor([g[3] for g in groups], dtype=torch.float32), cfg.scale).flatten()
        outs = [o for g in groups for o in g[2]]
        order = sorted(range(len(outs)), key=lambda i: len(outs[i].token_ids))
        trained_tokens = sum(len(o.token_ids) for o in outs if not self._masked(o))
        n = len(outs)
        k = min(self.num_chunks, n)
        bounds = [round(j * n / k) for j in range(k + 1)]
        chunks = []
        for a, b in zip(bounds, bounds[1:]):
            part = [outs[i] for i in order[a:b]]
            prompts: dict[tuple[int, ...], int] = {}
            index = [prompts.setdefault(tuple(o.prompt_token_ids), len(prompts)) for o in part]
            completions = right_padded([o.token_ids for o in part], pad)
            mask = torch.zeros(completions.shape)
            for i, o in enumerate(part):
                if not self._masked(o):
                    mask[i, :len(o.token_ids)] = 1.0
            mb = MicroBatch(right_padded(list(prompts), pad).to(device),
                            torch.tensor([len(p) for p in prompts], device=device),
                            torch.tensor(index, device=device), completions.to(device), mask.to(device),
                            adv[order[a:b]].to(device), None, None, n / self.num_chunks,
                            trained_tokens / self.num_chunks,
                            sum(map(len, prompts)) + sum(len(o.token_ids) for o in part), {})
            if self.ref is not None:  # scored once per rollout, without gradients
                mb.ref_logps = token_logps(self.ref, mb, cfg.temperature)
                self.ref_tokens += mb.tokens
            chunks.append(mb)
        assert len(chunks) == self.num_chunks, (len(chunks), self.num_chunks)  # P*G >= num_chunks by construction
        return chunks

    def _masked(self, out) -> bool:
        """Overlong masking: a completion cut off by the token limit trains nothing."""
        return self.cfg.overlong == "mask" and out.finish_reason == "length"


def make_loss_fn(cfg: GRPOConfig) -> Callable:
    def loss_fn(model: DeepseekV3ForCausalLM, mb: MicroBatch, mtp_weight: float | None = None):
        logps = token_logps(model, mb, cfg.temperature)
        if mb.old_logps is None:
            mb.old_logps = logps.detach()  # first pass: the sampling policy itself
        loss, stats = grpo_loss(logps, mb.old_logps, mb.ref_logps, mb.advantages, mb.mask,
                                loss_type=cfg.loss_type, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high,
                                beta=cfg.beta, max_completion_length=cfg.max_new_tokens,
                                num_sequences=mb.num_sequences, num_tokens=mb.num_tokens)
        aux = [m.aux_loss for m in model.moe_layers() if m.aux_loss is not None]
        if aux:
            loss = loss + torch.stack(aux).sum()
        return loss, {**mb.metrics, **stats}, mb.tokens

    return loss_fn


class GRPOTrainer(Trainer):
    """The one loop, plus the split of each step's time into rollout (generation, scoring, reference) and update."""

    def train_step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        out = super().train_step()
        out["update_seconds"] = time.perf_counter() - t0 - out.get("rollout_seconds", 0.0)
        return out


# ============================================================================ the stage
def grpo(init: str | Path, run_dir: str | Path, cfg: GRPOConfig, train_cfg: TrainConfig, resume: bool = False,
         device: str | None = None, price_per_hour: float | None = None, quiet: bool = False) -> dict[str, Any]:
    """Run GRPO from the model at `init` in `run_dir`; returns a summary (also in receipt.json)."""
    from nanoseek import cost
    from nanoseek.evaluate import evaluate_task

    cfg.validate()
    run_dir = Path(run_dir)
    init_dir = resolve_model_dir(init)
    if not (init_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{init_dir} has no tokenizer.json; GRPO needs the model's tokenizer for prompts")
    reward_fn = load_reward_fn(cfg.reward) if cfg.reward else None
    PromptSource(cfg)  # fail on a bad prompt file before anything is written
    per_step = cfg.prompts_per_step * cfg.group_size
    num_chunks = max(1, min(per_step, math.ceil(per_step / train_cfg.batch_size)))
    train_cfg = dataclasses.replace(train_cfg, grad_accum=num_chunks).validate()
    config = {"stage": "grpo", "init": str(init_dir), "grpo": dataclasses.asdict(cfg), "train": train_cfg.to_dict()}
    has_state = prepare_run(run_dir, config, resume)
    say = (lambda *a: None) if quiet else print

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = Tokenizer.load(init_dir)
    torch.manual_seed(train_cfg.seed)
    model = load_model(init_dir, dtype=torch.float32, device=device).train()
    ref = None
    if cfg.beta > 0:
        ref = load_model(init_dir, dtype=torch.float32, device=device).eval().requires_grad_(False)
    batches = RolloutBatches(model, tokenizer, cfg, num_chunks, ref_model=ref, reward_fn=reward_fn)

    def held_out(m: DeepseekV3ForCausalLM) -> dict[str, float]:
        """Greedy pass@1 on eval-split problems (and R1's sampled pass@1 with --eval-samples), through the rollout
        engine (it already holds the live model)."""
        ev = dict(task=cfg.task, num=cfg.eval_num, difficulty=cfg.eval_difficulty or cfg.difficulty,
                  max_tokens=cfg.max_new_tokens, seed=cfg.seed)
        s = evaluate_task(batches.engine, tokenizer, **ev)
        out = {"eval_accuracy": s["pass@1"], "eval_format_rate": s["format_rate"], "eval_length": s["mean_length"]}
        if cfg.eval_samples:
            sampled = evaluate_task(batches.engine, tokenizer, samples=cfg.eval_samples, **ev)
            out["eval_sampled_pass@1"] = sampled["pass@1"]
        return out

    eval_fn = held_out if cfg.task and cfg.eval_num > 0 else None

    device_key = cost.detect_device()
    dev = cost.get_device(device_key)
    precision = peak_precision(train_cfg.precision, torch.device(device), dev)  # what the multiplies run in
    seq_len = 64 + cfg.max_new_tokens
    trainer = GRPOTrainer(model, train_cfg, run_dir, batches, make_loss_fn(cfg), stage="grpo", eval_fn=eval_fn,
                          flops_per_token=cost.flops_per_token(model.config, seq_len, include_mtp=False),
                          device_name=device_key, peak_flops=dev.peak_flops(precision))
    before = None
    if has_state:
        trainer.resume_latest()
        say(f"resumed {run_dir} at step {trainer.step}")
    elif eval_fn is not None:  # step 0: the starting point of the eval curve
        before = trainer.evaluate()
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"stage": "grpo", "step": 0, "elapsed": 0.0, **before}) + "\n")
        say(f"held-out pass@1 before GRPO: {before['eval_accuracy']:.3f} on {cfg.eval_num} problems")
    n_params = sum(p.numel() for p in model.parameters())
    say(f"GRPO on {device}: {cfg.prompts_per_step} prompts x {cfg.group_size} samples per step, "
        f"loss {cfg.loss_type}, beta {cfg.beta}, {num_chunks} micro-batch(es) per step")

    t0 = time.perf_counter()
    final = trainer.fit()
    save_model(model, run_dir / "model", tokenizer=tokenizer)
    infer_flops = cost.flops_per_token(model.config, seq_len, training=False, include_mtp=False)
    flops = trainer.tokens * trainer.flops_per_token + (batches.rollout_tokens + batches.ref_tokens) * infer_flops
    receipt = cost.make_receipt("grpo", device_key, trainer.elapsed, trainer.tokens, flops, precision=precision,
                                price_per_hour=price_per_hour, steps=trainer.step, params=n_params,
                                rollout_tokens=batches.rollout_tokens, eval_accuracy=final.get("eval_accuracy"),
                                eval_accuracy_before=(before or {}).get("eval_accuracy"))
    cost.write_receipt(receipt, run_dir / "receipt.json")
    summary = {"run": str(run_dir), "steps": trainer.step, "reward": final.get("reward"),
               "eval_accuracy": final.get("eval_accuracy"), "eval_accuracy_before": (before or {}).get("eval_accuracy"),
               "wall_seconds": time.perf_counter() - t0, **receipt.to_dict()}
    say(f"done: {trainer.step} steps in {trainer.elapsed:.0f}s; held-out pass@1 "
        f"{summary['eval_accuracy_before']} -> {summary['eval_accuracy']}; model in {run_dir / 'model'}")
    return summary
