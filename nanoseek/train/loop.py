"""The one training loop. Pretraining, SFT and GRPO differ only in their batches and their loss function.

    trainer = Trainer(model, TrainConfig(...), run_dir, batches, loss_fn, ...)
    trainer.fit()

Per optimizer step: `grad_accum` micro-batches (bf16 autocast), gradient clipping, AdamW, the learning-rate
schedule (warmup, then cosine or WSD), and DeepSeek's aux-loss-free bias update (counts gathered over the whole
step). A non-finite loss skips the step with a warning; several in a row abort with a clear message.

Everything a step produces goes to the run directory: `metrics.jsonl` every step (and tensorboard events when
tensorboard is installed), held-out loss every `eval_every` steps, a resumable checkpoint every
`checkpoint_every` steps and at the end (model, optimizer, schedule position, data position, RNG states),
written atomically. Ctrl-C writes a checkpoint and stops cleanly; `--resume` continues bit-for-bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from nanoseek.checkpoint import atomic_write_json, atomic_write_text
from nanoseek.model.transformer import DeepseekV3ForCausalLM
from nanoseek.train.distributed import (all_reduce_max, all_reduce_mean, clip_grad_norm_, gather_objects,
                                        load_sharded, save_sharded, shared_atomic_directory)

# (loss, metrics, tokens) for one micro-batch; metrics are floats or 0-dim tensors
LossFn = Callable[[DeepseekV3ForCausalLM, Any], tuple[torch.Tensor, dict[str, Any], int]]


@dataclass
class TrainConfig:
    # how long: the first limit reached stops the run (None = unused)
    steps: int | None = None
    tokens: int | None = None
    minutes: float | None = None
    # batch
    batch_size: int = 16  # sequences per micro-batch (per rank)
    seq_len: int = 256
    grad_accum: int = 1
    # optimiser and schedule
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    schedule: str = "cosine"  # "cosine" | "wsd" (warmup, stable, decay over the last `decay_frac`) | "constant"
    decay_frac: float = 0.2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8  # larger values shrink the steps of weights whose gradients are mostly noise (RL)
    grad_clip: float = 1.0
    # DeepSeek-V3 schedules: MTP weight drops late in training; the balancing bias freezes for the last tokens
    mtp_weight_late: float | None = None  # weight after `mtp_late_frac` of training (V3: 0.3 -> 0.1)
    mtp_late_frac: float = 0.7
    bias_freeze_frac: float = 1.0  # stop bias updates after this fraction (V3: ~0.97)
    # numerics and speed
    precision: str = "auto"  # "auto" | "bf16" (autocast) | "fp32" | "fp8"; auto: bf16 where the hardware has it
    compile: bool = False
    # bookkeeping
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 1
    max_bad_steps: int = 5
    seed: int = 1337

    def validate(self) -> "TrainConfig":
        if not (self.steps or self.tokens or self.minutes):
            raise ValueError("say how long to train: give --steps, --tokens or --minutes")
        for name in ("batch_size", "seq_len", "grad_accum"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise ValueError(f"schedule {self.schedule!r} is unknown; use cosine, wsd or constant")
        if self.precision not in ("auto", "bf16", "fp32", "fp8"):
            raise ValueError(f"precision {self.precision!r} is unknown; use auto, bf16, fp32 or fp8")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def lr_multiplier(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warmup over `warmup_steps`, then the schedule as a function of training progress in [0, 1]."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    lo = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "wsd":
        start = 1.0 - cfg.decay_frac
        return 1.0 if progress < start else 1.0 - (1.0 - lo) * min(1.0, (progress - start) / cfg.decay_frac)
    return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms, biases and the embedding (vectors and lookup tables)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "embed_tokens" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs: dict[str, Any] = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.adam_eps}
    device_type = next(model.parameters()).device.type
    if device_type == "cuda":
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    return torch.optim.AdamW(groups, **kwargs)


def native_bf16(device: torch.device) -> bool:
    """Does this device multiply bf16 fast? GPUs do; most CPUs without AVX512-BF16/AMX run it ~50x slower than fp32."""
    if device.type != "cpu":
        return device.type == "cuda"
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def peak_precision(precision: str, device: torch.device, dev) -> str:
    """The precision whose peak FLOP/s MFU and the receipt should use: where FP8 is emulated (no FP8 units) or bf16
    is emulated (a CPU without a bf16 GEMM, see model/linear.py) the multiplies run in fp32."""
    precision = resolve_precision(precision, device)
    if (precision == "fp8" and not dev.fp8_tflops) or (precision == "bf16" and not native_bf16(device)):
        return "fp32"
    return precision


def autocast(cfg: TrainConfig, device: torch.device):
    if resolve_precision(cfg.precision, device) in ("bf16", "fp8"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ============================================================================ RNG and checkpoints
def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _json_rng(state: dict[str, Any]) -> dict[str, Any]:
    """RNG states as JSON-able data (no pickling on load): tensors to lists, numpy's array to a list."""
    py = state["python"]
    npy = state["numpy"]
    out = {"python": [py[0], list(py[1]), py[2]],
           "numpy": [npy[0], npy[1].tolist(), int(npy[2]), int(npy[3]), float(npy[4])],
           "torch": state["torch"].tolist()}
    if "cuda" in state:
        out["cuda"] = [s.tolist() for s in state["cuda"]]
    return out


def _rng_from_json(d: dict[str, Any]) -> dict[str, Any]:
    py = d["python"]
    npy = d["numpy"]
    state = {"python": (py[0], tuple(py[1]), py[2]),
             "numpy": (npy[0], np.array(npy[1], dtype=np.uint32), npy[2], npy[3], npy[4]),
             "torch": torch.tensor(d["torch"], dtype=torch.uint8)}
    if "cuda" in d:
        state["cuda"] = [torch.tensor(s, dtype=torch.uint8) for s in d["cuda"]]
    return state


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints (a `state.json` is written last), oldest first."""
    root = run_dir / "checkpoints"
    if not root.exists():
        return []
    found = [p for p in root.glob("step_*") if (p / "state.json").exists() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


# ============================================================================ the trainer
class Trainer:
    def __init__(self, model: DeepseekV3ForCausalLM, cfg: TrainConfig, run_dir: str | Path,
                 batches: Iterator, loss_fn: LossFn, *, stage: str = "pretrain",
                 eval_fn: Callable[[DeepseekV3ForCausalLM], dict[str, float]] | None = None,
                 flops_per_token: float = 0.0, device_name: str = "cpu", peak_flops: float | None = None,
                 on_step: Callable[[int, dict[str, Any]], None] | None = None):
        self.model, self.cfg, self.run_dir = model, cfg.validate(), Path(run_dir)
        self.batches, self.loss_fn, self.eval_fn, self.stage = batches, loss_fn, eval_fn, stage
        self.flops_per_token, self.device_name, self.peak_flops = flops_per_token, device_name, peak_flops
        self.on_step = on_step
        self.device = next(model.parameters()).device
        self.rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.optimizer = make_optimizer(model, cfg)
        self.step = 0
        self.tokens = 0
        self.elapsed = 0.0  # training seconds, summed over resumes
        self.bad_steps = 0
        self.last_metrics: dict[str, Any] = {}
        if cfg.compile:  # each decoder layer (and MTP module) in place: the loss code around them stays eager
            for layer in model.model.layers:
                layer.compile()
        self._tb = None

    # ---------------------------------------------------------------- progress and limits
    def progress(self) -> float:
        c, p = self.cfg, 0.0
        if c.steps:
            p = max(p, self.step / c.steps)
        if c.tokens:
            p = max(p, self.tokens / c.tokens)
        if c.minutes:
            p = max(p, self.elapsed / (60 * c.minutes))
        return min(p, 1.0)

    def done(self) -> bool:
        return self.progress() >= 1.0

    # ---------------------------------------------------------------- one optimizer step
    def train_step(self) -> dict[str, Any]:
        cfg, model = self.cfg, self.model
        model.train()
        progress = self.progress()
        mult = lr_multiplier(cfg, self.step, progress)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * mult
        mtp_weight = model.config.mtp_loss_weight
        if cfg.mtp_weight_late is not None and progress >= cfg.mtp_late_frac:
            mtp_weight = cfg.mtp_weight_late

        totals: dict[str, float] = {}
        tokens = 0
        finite = True
        for _ in range(cfg.grad_accum):
            batch = next(self.batches)
            with autocast(cfg, self.device):
                loss, metrics, n = self.loss_fn(model, batch, mtp_weight=mtp_weight)
            if not torch.isfinite(loss):
                finite = False
            (loss / cfg.grad_accum).backward()
            tokens += n
            for k, v in {"loss": loss.detach(), **metrics}.items():
                totals[k] = totals.get(k, 0.0) + float(v) / cfg.grad_accum
        if self.world > 1:  # log the mean over ranks (= one process's numbers for the same global batch)
            totals = all_reduce_mean(totals)
            finite = finite and math.isfinite(totals["loss"])
        grad_norm = clip_grad_norm_(model.parameters(), cfg.grad_clip)  # global norm, also over shards
        finite = finite and bool(torch.isfinite(grad_norm))
        if finite:
            self.optimizer.step()
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            warnings.warn(f"step {self.step}: non-finite loss or gradient, step skipped "
                          f"({self.bad_steps} in a row)", stacklevel=2)
            if self.bad_steps >= cfg.max_bad_steps:
                raise FloatingPointError(
                    f"{self.bad_steps} steps in a row had a non-finite loss or gradient; lower --set lr=... "
                    f"(now {cfg.lr}) or use --precision fp32, then --resume from the last checkpoint")
        self.optimizer.zero_grad(set_to_none=True)
        if finite and progress < cfg.bias_freeze_frac:
            loads = model.update_expert_bias()
        else:  # skipped step or frozen bias: drop this step's counts without moving the bias
            loads = []
            for m in model.moe_layers():
                m.load_counts.zero_()
        self.step += 1
        self.tokens += tokens * self.world
        out = {"step": self.step, "lr": cfg.lr * mult, "grad_norm": float(grad_norm), "tokens": self.tokens,
               "step_tokens": tokens * self.world, "mtp_weight": mtp_weight, "skipped": not finite, **totals}
        if loads:
            out["expert_load_max_over_mean"] = [round(s["load_max_over_mean"], 4) for s in loads]
            out["bias_norm"] = [round(s["bias_norm"], 5) for s in loads]
        return out

    # ---------------------------------------------------------------- the loop
    def fit(self) -> dict[str, Any]:
        is_main = self.rank == 0
        bar = tqdm(total=self._bar_total(), initial=self._bar_value(), desc=self.stage, unit=self._bar_unit(),
                   disable=not is_main, dynamic_ncols=True, leave=True)
        interrupted = False
        try:
            while not self.done():
                t0 = time.perf_counter()
                metrics = self.train_step()
                dt = time.perf_counter() - t0
                self.elapsed = all_reduce_max(self.elapsed + dt)  # ranks agree on time budgets
                metrics["step_seconds"] = dt
                metrics["tokens_per_second"] = metrics["step_tokens"] / dt
                metrics["mfu"] = self._mfu(metrics["tokens_per_second"])
                metrics["elapsed"] = self.elapsed
                if self.eval_fn and (self.step % self.cfg.eval_every == 0 or self.done()):
                    t1 = time.perf_counter()
                    metrics.update(self.evaluate())
                    # held-out evaluation is part of the run: it counts against --minutes budgets
                    self.elapsed = all_reduce_max(self.elapsed + time.perf_counter() - t1)
                    metrics["elapsed"] = self.elapsed
                self.last_metrics = metrics
                if is_main:
                    self._log(metrics)
                    bar.update(self._bar_value() - bar.n)
                    bar.set_postfix_str(self._postfix(metrics))
                if self.on_step:
                    self.on_step(self.step, metrics)
                if self.step % self.cfg.checkpoint_every == 0 and not self.done():
                    self.save_checkpoint()
        except KeyboardInterrupt:
            interrupted = True
            if is_main:
                bar.write(f"interrupted at step {self.step}: writing a checkpoint; resume with --resume")
        finally:
            bar.close()
        self.save_checkpoint()
        if interrupted:
            raise KeyboardInterrupt
        return self.last_metrics

    def _mfu(self, tokens_per_second: float | None) -> float | None:
        if not tokens_per_second or not self.peak_flops or not self.flops_per_token:
            return None
        return tokens_per_second * self.flops_per_token / (self.peak_flops * self.world)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        try:
            with autocast(self.cfg, self.device):
                return self.eval_fn(self.model)
        finally:
            self.model.train()

    # ---------------------------------------------------------------- progress bar
    def _bar_unit(self) -> str:
        return "step" if self.cfg.steps else "tok" if self.cfg.tokens else "s"

    def _bar_total(self) -> float:
        c = self.cfg
        return c.steps if c.steps else c.tokens if c.tokens else round(60 * c.minutes)

    def _bar_value(self) -> float:
        c = self.cfg
        return self.step if c.steps else self.tokens if c.tokens else round(self.elapsed)

    @staticmethod
    def _postfix(m: dict[str, Any]) -> str:
        parts = [f"loss {m['loss']:.3f}"]
        if "val_loss" in m:
            parts.append(f"val {m['val_loss']:.3f}")
        if m.get("reward") is not None:
            parts.append(f"reward {m['reward']:.3f}")
        if m.get("tokens_per_second"):
            parts.append(f"{m['tokens_per_second']:,.0f} tok/s")
        if m.get("mfu") is not None:
            parts.append(f"MFU {100 * m['mfu']:.1f}%")
        return " | ".join(parts)

    # ---------------------------------------------------------------- logging
    def _log(self, metrics: dict[str, Any]) -> None:
        if self.step % self.cfg.log_every and not self.done():
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"stage": self.stage, **metrics}) + "\n")
        tb = self._tensorboard()
        if tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
                    tb.add_scalar(f"{self.stage}/{k}", v, self.step)

    def _tensorboard(self):
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except Exception:  # tensorboard is optional
                self._tb = False
        return self._tb or None

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path | None:
        """model + optimizer (a torch.distributed.checkpoint directory: every rank writes its shards) + position,
        data position and RNG (state.json, written last by rank 0), atomically; keeps the newest
        `keep_checkpoints`. Every rank calls this."""
        path = self.run_dir / "checkpoints" / f"step_{self.step}"
        rngs = gather_objects(_json_rng(rng_state()))
        with shared_atomic_directory(path) as tmp:
            save_sharded(tmp, self.model, self.optimizer)
            if self.rank == 0:
                data_state = self.batches.state_dict() if hasattr(self.batches, "state_dict") else None
                atomic_write_json(tmp / "state.json", {
                    "step": self.step, "tokens": self.tokens, "elapsed": self.elapsed, "stage": self.stage,
                    "data": data_state, "rng": rngs[0], "rng_per_rank": rngs,
                    "world_size": self.world, "last_metrics": _jsonable(self.last_metrics),
                })
        if self.rank == 0:
            for old in checkpoint_dirs(self.run_dir)[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        return path

    def load_checkpoint(self, path: Path) -> None:
        """Any world size's checkpoint: DCP reshards the model and optimizer onto this run's ranks."""
        state = json.loads((path / "state.json").read_text())
        load_sharded(path, self.model, self.optimizer)
        self.step, self.tokens, self.elapsed = state["step"], state["tokens"], state["elapsed"]
        self.last_metrics = state.get("last_metrics") or {}
        if state.get("data") is not None and hasattr(self.batches, "load_state_dict"):
            self.batches.load_state_dict(state["data"])
        same_world = state.get("world_size", 1) == self.world and "rng_per_rank" in state
        set_rng_state(_rng_from_json(state["rng_per_rank"][self.rank] if same_world else state["rng"]))

    def resume_latest(self) -> bool:
        found = checkpoint_dirs(self.run_dir)
        if not found:
            return False
        self.load_checkpoint(found[-1])
        self._forget_metrics_after(self.step)
        return True

    def _forget_metrics_after(self, step: int) -> None:
        """A run killed after its last checkpoint logged steps it will now redo: drop those lines."""
        path = self.run_dir / "metrics.jsonl"
        if self.rank != 0 or not path.exists():
            return
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and not _is_later(line, self.stage, step)]
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def _is_later(line: str, stage: str, step: int) -> bool:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return True  # a line cut short by a kill
    return record.get("stage") == stage and record.get("step", 0) > step


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool, list, type(None)))}
