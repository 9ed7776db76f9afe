"""Chat SFT (loss on assistant tokens only) and distillation from a teacher's verified traces, on the one loop.

Data is JSONL in the OpenAI format, one conversation per line: {"messages": [{"role": "user", "content": ...},
{"role": "assistant", "content": ...}]}. Each conversation is rendered with the chat template and a loss mask
(1 on assistant content and the EOS that closes each assistant turn). Conversations are packed whole into
fixed-length rows (a row ends with padding when the next one does not fit), because a conversation cut in two
would train its second half without the question. Every conversation starts with BOS, so packing several in a
row is the same document separation pretraining uses.

Distillation (R1 section 2.4) is rejection sampling plus SFT: the teacher answers each training prompt K times,
the task verifier keeps only correct, well-formed answers, and the student is fine-tuned on them.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch

from nanoseek.checkpoint import atomic_write_json, atomic_write_text, load_model, resolve_model_dir, save_model
from nanoseek.data.sources import read_jsonl_rows
from nanoseek.data.tasks import conversation, get_task, is_well_formed
from nanoseek.model.transformer import DeepseekV3ForCausalLM
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.loop import Trainer, TrainConfig, peak_precision
from nanoseek.train.run import prepare_run

IGNORE_INDEX = -100
# The routing bias stays as pretraining left it (see grpo.TRAIN_DEFAULTS): fine-tuning data is narrow, and
# balancing its load would reroute the tokens of everything else.
TRAIN_DEFAULTS = {"lr": 3e-4, "warmup_steps": 10, "schedule": "cosine", "batch_size": 16, "seq_len": 512,
                  "eval_every": 50, "checkpoint_every": 200, "bias_freeze_frac": 0.0}


# ============================================================================ data
def read_conversations(path: str | Path) -> list[list[dict]]:
    """The `messages` of every line; one clear error naming the first bad line."""
    convs = []
    for n, row in read_jsonl_rows(path, "SFT data"):
        msgs = row.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
            raise ValueError(f"{path} line {n} needs a \"messages\" list of {{\"role\", \"content\"}} objects")
        if not any(m.get("role") == "assistant" for m in msgs):
            raise ValueError(f"{path} line {n} has no assistant message, so nothing to learn from")
        convs.append(msgs)
    if not convs:
        raise ValueError(f"SFT data {path} holds no conversations")
    return convs


def pack_conversations(tokenizer: Tokenizer, convs: list[list[dict]], seq_len: int
                       ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Rows of seq_len + 1 token ids with their loss mask, conversations packed whole (first fit, in order).

    Returns (ids [R, seq_len+1], mask [R, seq_len+1], number of conversations truncated to fit one row)."""
    width = seq_len + 1
    rows_ids: list[list[int]] = []
    rows_mask: list[list[int]] = []
    cur_ids: list[int] = []
    cur_mask: list[int] = []
    truncated = 0
    for msgs in convs:
        ids, mask = tokenizer.encode_chat(msgs)
        if len(ids) > width:
            ids, mask = ids[:width], mask[:width]
            truncated += 1
        if len(cur_ids) + len(ids) > width:
            rows_ids.append(cur_ids)
            rows_mask.append(cur_mask)
            cur_ids, cur_mask = [], []
        cur_ids += ids
        cur_mask += mask
    if cur_ids:
        rows_ids.append(cur_ids)
        rows_mask.append(cur_mask)
    return *pad_rows(list(zip(rows_ids, rows_mask)), width, tokenizer.pad_id), truncated


def pad_rows(rows: list[tuple[list[int], list[int]]], width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) rows of at most `width` tokens -> tensors [R, width], right-padded (pad_id, mask 0)."""
    ids_t = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask_t = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (ids, mask) in enumerate(rows):
        ids_t[r, :len(ids)] = torch.tensor(ids)
        mask_t[r, :len(mask)] = torch.tensor(mask)
    return ids_t, mask_t


def inputs_targets(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token pairs; a target counts only where the mask is 1 (assistant tokens), else IGNORE_INDEX."""
    targets = ids[:, 1:].clone()
    targets[mask[:, 1:] == 0] = IGNORE_INDEX
    return ids[:, :-1].contiguous(), targets


class RowBatches:
    """Shuffled epochs over packed rows, `batch_size` rows at a time; state_dict/load_state_dict resume exactly."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, batch_size: int, seed: int = 0):
        self.ids, self.mask, self.batch_size, self.seed = ids, mask, batch_size, seed
        self.epoch, self.pos = 0, 0

    def _order(self) -> list[int]:
        return random.Random(f"sft/{self.seed}/{self.epoch}").sample(range(len(self.ids)), len(self.ids))

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        picked: list[int] = []
        while len(picked) < self.batch_size:
            order = self._order()
            take = order[self.pos:self.pos + self.batch_size - len(picked)]
            picked += take
            self.pos += len(take)
            if self.pos >= len(order):
                self.epoch, self.pos = self.epoch + 1, 0
        idx = torch.tensor(picked)
        return inputs_targets(self.ids[idx], self.mask[idx])

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]


def sft_loss(model: DeepseekV3ForCausalLM, batch, mtp_weight: float | None = None):
    inputs, targets = (t.to(next(model.parameters()).device) for t in batch)
    loss, metrics = model.loss(inputs, targets, mtp_weight=mtp_weight)
    metrics["trained_tokens"] = float((targets != IGNORE_INDEX).sum())
    return loss, metrics, inputs.numel()


def held_out_sft_loss(batches: list, model: DeepseekV3ForCausalLM) -> dict[str, float]:
    """Mean next-token loss on held-out assistant tokens (MTP and aux terms excluded)."""
    total, n = 0.0, 0
    for inputs, targets in batches:
        k = int((targets != IGNORE_INDEX).sum())
        _, metrics = model.loss(inputs, targets, mtp_weight=0.0)
        total, n = total + float(metrics["main_loss"]) * k, n + k
    return {"val_loss": total / max(n, 1)}


# ============================================================================ the stage
def sft(init: str | Path, data: str | Path, run_dir: str | Path, train_cfg: TrainConfig, resume: bool = False,
        epochs: float | None = None, val_fraction: float = 0.05, device: str | None = None,
        price_per_hour: float | None = None, quiet: bool = False, stage: str = "sft") -> dict[str, Any]:
    """Fine-tune the model at `init` on the conversations in `data`; returns a summary (also in receipt.json).
    `epochs` sets the number of steps when no other limit is given."""
    from nanoseek import cost

    say = (lambda *a: None) if quiet else print
    init_dir = resolve_model_dir(init)
    if not (init_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{init_dir} has no tokenizer.json; SFT needs the model's tokenizer")
    convs = read_conversations(data)
    tokenizer = Tokenizer.load(init_dir)
    rng = random.Random(train_cfg.seed)
    order = rng.sample(range(len(convs)), len(convs))
    n_val = min(64, int(len(convs) * val_fraction)) if len(convs) >= 20 else 0
    val_convs, train_convs = [convs[i] for i in order[:n_val]], [convs[i] for i in order[n_val:]]
    ids, mask, truncated = pack_conversations(tokenizer, train_convs, train_cfg.seq_len)
    if epochs is not None and not (train_cfg.steps or train_cfg.tokens or train_cfg.minutes):
        train_cfg.steps = max(1, math.ceil(epochs * len(ids) / (train_cfg.batch_size * train_cfg.grad_accum)))
    train_cfg.validate()
    run_dir = Path(run_dir)
    config = {"stage": stage, "init": str(init_dir), "data": str(data), "train": train_cfg.to_dict(),
              "epochs": epochs, "val_fraction": val_fraction}
    has_state = prepare_run(run_dir, config, resume)
    trained = int(mask[:, 1:].sum())
    say(f"data: {len(train_convs)} conversations packed into {len(ids)} rows of {train_cfg.seq_len} tokens "
        f"({trained:,} trained tokens, {1 - float((ids != tokenizer.pad_id).float().mean()):.0%} padding); "
        f"{n_val} held out" + (f"; {truncated} truncated to fit a row" if truncated else ""))

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(train_cfg.seed)
    model = load_model(init_dir, dtype=torch.float32, device=device).train()
    if model.config.max_position_embeddings < train_cfg.seq_len:
        raise ValueError(f"--seq-len {train_cfg.seq_len} exceeds the model's context "
                         f"({model.config.max_position_embeddings}); lower --seq-len")
    eval_fn = None
    if n_val:
        vi, vm, _ = pack_conversations(tokenizer, val_convs, train_cfg.seq_len)
        val = [tuple(t.to(device) for t in inputs_targets(vi[j:j + train_cfg.batch_size], vm[j:j + train_cfg.batch_size]))
               for j in range(0, len(vi), train_cfg.batch_size)][: train_cfg.eval_batches]
        eval_fn = lambda m: held_out_sft_loss(val, m)  # noqa: E731
    device_key = cost.detect_device()
    dev = cost.get_device(device_key)
    precision = peak_precision(train_cfg.precision, torch.device(device), dev)  # what the multiplies run in
    trainer = Trainer(model, train_cfg, run_dir, RowBatches(ids, mask, train_cfg.batch_size, train_cfg.seed),
                      sft_loss, stage=stage, eval_fn=eval_fn,
                      flops_per_token=cost.flops_per_token(model.config, train_cfg.seq_len),
                      device_name=device_key, peak_flops=dev.peak_flops(precision))
    if has_state:
        trainer.resume_latest()
        say(f"resumed {run_dir} at step {trainer.step}")
    t0 = time.perf_counter()
    final = trainer.fit()
    save_model(model, run_dir / "model", tokenizer=tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    receipt = cost.make_receipt(stage, device_key, trainer.elapsed, trainer.tokens,
                                trainer.tokens * trainer.flops_per_token, precision=precision,
                                price_per_hour=price_per_hour, steps=trainer.step, params=n_params,
                                conversations=len(train_convs), val_loss=final.get("val_loss"))
    cost.write_receipt(receipt, run_dir / "receipt.json")
    say(f"done: {trainer.step} steps, loss {final.get('loss', math.nan):.4f}"
        + (f", held-out loss {final['val_loss']:.4f}" if "val_loss" in final else "") + f"; model in {run_dir / 'model'}")
    return {"run": str(run_dir), "steps": trainer.step, "loss": final.get("loss"), "val_loss": final.get("val_loss"),
            "wall_seconds": time.perf_counter() - t0, **receipt.to_dict()}


# ============================================================================ distillation
def teacher_traces(teacher, task_name: str, num_prompts: int, samples: int = 4, difficulty=None,
                   temperature: float = 0.7, max_tokens: int = 512, per_prompt: int = 1, seed: int = 0,
                   max_batch: int = 32, progress: bool = True) -> tuple[list[dict], dict[str, Any]]:
    """Rejection sampling: `samples` answers per train prompt, keep up to `per_prompt` distinct verified-correct,
    well-formed ones. Returns (SFT rows {"messages": [...]} , stats)."""
    from nanoseek.evaluate import task_problems
    from nanoseek.infer.engine import Engine

    task = get_task(task_name)
    engine = teacher if isinstance(teacher, Engine) else Engine(teacher, max_batch=max_batch)
    if engine.tokenizer is None:
        raise ValueError("the teacher model directory has no tokenizer.json")
    problems = task_problems(task, num_prompts, difficulty, seed=seed + 1, split="train")
    chats = [[{"role": "user", "content": task.prompt(p)}] for p in problems for _ in range(samples)]
    t0 = time.perf_counter()
    outs = engine.generate(chats, max_tokens=max_tokens, chat=True, temperature=temperature, seed=seed,
                           progress=progress)
    rows, correct, solved = [], 0, 0
    for i, p in enumerate(problems):
        kept: list[str] = []
        for o in outs[i * samples:(i + 1) * samples]:
            ok = task.verify(p, o.text).accuracy > 0 and is_well_formed(o.text) and o.finish_reason == "stop"
            correct += ok
            if ok and o.text.strip() not in kept and len(kept) < per_prompt:
                kept.append(o.text.strip())
        solved += bool(kept)
        rows += [{**conversation(task, p, t), "difficulty": p.difficulty} for t in kept]
    stats = {"prompts": num_prompts, "samples": samples, "generated": len(outs), "correct": correct,
             "acceptance_rate": correct / len(outs), "prompts_solved": solved, "traces": len(rows),
             "generation_seconds": time.perf_counter() - t0}
    return rows, stats


def distill(teacher: str | Path, run_dir: str | Path, task: str, student_init: str | Path, train_cfg: TrainConfig,
            samples: int = 4, num_prompts: int = 256, difficulty=None, temperature: float = 0.7,
            max_tokens: int = 512, per_prompt: int = 1, epochs: float | None = 3.0, seed: int = 0,
            price_per_hour: float | None = None, quiet: bool = False) -> dict[str, Any]:
    """Teacher traces -> run_dir/traces.jsonl (verified only) -> SFT of `student_init` in run_dir/student."""
    say = (lambda *a: None) if quiet else print
    run_dir = Path(run_dir)
    get_task(task)
    traces = run_dir / "traces.jsonl"
    if traces.exists():
        say(f"reusing the verified traces in {traces}")
        stats = json.loads((run_dir / "traces.json").read_text())
    else:
        rows, stats = teacher_traces(resolve_model_dir(teacher), task, num_prompts, samples, difficulty, temperature,
                                     max_tokens, per_prompt, seed, progress=not quiet)
        if not rows:
            raise ValueError(f"the teacher solved none of {num_prompts} prompts ({samples} samples each); try an "
                             f"easier --difficulty, more --samples or a stronger teacher")
        atomic_write_text(traces, "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_json(run_dir / "traces.json", stats)
    say(f"teacher: {stats['correct']}/{stats['generated']} samples verified correct "
        f"({stats['acceptance_rate']:.0%}); {stats['traces']} traces from {stats['prompts_solved']} prompts")
    summary = sft(student_init, traces, run_dir / "student", train_cfg, epochs=epochs, stage="distill",
                  price_per_hour=price_per_hour, quiet=quiet)
    return {**summary, "traces": stats, "model": str(run_dir / "student" / "model")}
