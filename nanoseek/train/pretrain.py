"""Pretraining: next-token + MTP objective on packed text, from a preset or a config, on the one loop.

Steps: resolve the model config -> tokenizer (trained on the data unless given) -> tokenised shards under the
run directory -> the loop -> the final model in Hugging Face layout with its tokenizer -> receipt.json.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanoseek.config import ModelConfig
from nanoseek.data.shards import (PackedLoader, ShardInfo, TokenizerEncoder, build_shards, check_vocab,
                                  iter_eval_batches, load_shards)
from nanoseek.data.sources import describe_sources, read_documents
from nanoseek.fp8 import convert_to_fp8_training, memory_report
from nanoseek.model.transformer import DeepseekV3ForCausalLM
from nanoseek.tokenizer import Tokenizer
from nanoseek.train import distributed as D
from nanoseek.train.loop import Trainer, TrainConfig, peak_precision, resolve_precision
from nanoseek.train.run import prepare_run


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=lambda: ["builtin"])
    text_field: str = "text"
    builtin_docs: int = 60_000  # documents drawn from the built-in task corpus when `builtin` is a path
    tokenizer: str | None = None  # an existing tokenizer directory; else one is trained on the data
    tokenizer_docs: int = 20_000  # documents used to train the tokenizer
    val_fraction: float = 0.01
    seed: int = 0


def lm_loss(model: DeepseekV3ForCausalLM, batch, mtp_weight: float | None = None):
    inputs, targets = (t.to(next(model.parameters()).device) for t in batch)
    loss, metrics = model.loss(inputs, targets, mtp_weight=mtp_weight)
    return loss, metrics, inputs.numel()


def held_out_loss(batches: list, model: DeepseekV3ForCausalLM) -> dict[str, float]:
    """Mean next-token loss over a fixed set of held-out batches (MTP and aux terms excluded)."""
    total, n = 0.0, 0
    for inputs, targets in batches:
        _, metrics = model.loss(inputs, targets, mtp_weight=0.0)
        total += float(metrics["main_loss"]) * inputs.numel()
        n += inputs.numel()
    return {"val_loss": total / max(n, 1)}


def unigram_entropy(info: ShardInfo, max_tokens: int = 20_000_000) -> float:
    """Entropy (nats/token) of the training split's token frequencies: the loss of a model that ignores context."""
    counts = np.zeros(info.vocab_size, dtype=np.int64)
    seen = 0
    for path in sorted(info.dir.glob("train_*.bin")):
        tokens = np.fromfile(path, dtype=info.dtype)[: max_tokens - seen]
        counts += np.bincount(tokens, minlength=info.vocab_size)
        seen += len(tokens)
        if seen >= max_tokens:
            break
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def prepare_tokenizer(data: DataConfig, run_dir: Path, vocab_size: int) -> Tokenizer:
    target = run_dir / "tokenizer"
    if data.tokenizer:
        tok = Tokenizer.load(data.tokenizer)
    elif (target / "tokenizer.json").exists():
        return Tokenizer.load(target)
    else:
        docs = itertools.islice(read_documents(data.paths, data.text_field, seed=data.seed,
                                                   builtin_docs=data.builtin_docs),
                                data.tokenizer_docs)
        tok = Tokenizer.train(docs, vocab_size)
    if tok.vocab_size > vocab_size:
        raise ValueError(f"the model's vocab_size ({vocab_size}) is smaller than the tokenizer's ({tok.vocab_size}); "
                         f"pass --set vocab_size={tok.vocab_size} or a smaller tokenizer")
    tok.save(target)
    return tok


def prepare_shards(data: DataConfig, run_dir: Path, tokenizer: Tokenizer, model_vocab: int) -> ShardInfo:
    paths, where = data.paths, dict(seed=data.seed, builtin_docs=data.builtin_docs)
    info = build_shards(read_documents(paths, data.text_field, **where),
                        TokenizerEncoder(run_dir / "tokenizer"), run_dir / "data",
                        eos_id=tokenizer.eos_id, bos_id=tokenizer.bos_id, vocab_size=tokenizer.vocab_size,
                        val_fraction=data.val_fraction, seed=data.seed,
                        source=describe_sources(paths, data.text_field, **where))
    check_vocab(info, model_vocab)
    return info


def pretrain(model_cfg: ModelConfig, train_cfg: TrainConfig, data: DataConfig, run_dir: str | Path,
             resume: bool = False, device: str | None = None, price_per_hour: float | None = None,
             quiet: bool = False, ep_size: int = 1) -> dict[str, Any]:
    """Run (or resume) a pretraining run in `run_dir`; returns a summary dict (also in receipt.json).

    Under torchrun every rank calls this: rank 0 prepares the run directory, tokenizer and shards while the
    others wait; each rank trains on its part of every global batch (`batch_size` sequences per rank)."""
    from nanoseek import cost  # a leaf: FLOPs per token, device peak and price for the receipt

    run_dir = Path(run_dir)
    train_cfg.validate()
    device = str(D.init_distributed(device))  # no-op without torchrun
    rank, world = D.get_rank(), D.get_world_size()
    # config.json records the global batch (per rank x ranks), so a run may resume on another number of ranks
    config = {"stage": "pretrain", "model": model_cfg.to_hf_dict(),
              "train": {**train_cfg.to_dict(), "batch_size": train_cfg.batch_size * world}, "data": data.__dict__}
    say = (lambda *a: None) if quiet or rank else print

    def prepare() -> bool:
        has_state = prepare_run(run_dir, config, resume)
        prepare_shards(data, run_dir, prepare_tokenizer(data, run_dir, model_cfg.vocab_size), model_cfg.vocab_size)
        return has_state

    has_state = D.run_on_main(prepare)  # the other ranks wait, then read what rank 0 wrote
    tokenizer = Tokenizer.load(run_dir / "tokenizer")
    info = load_shards(run_dir / "data")
    say(f"data: {info.split('train').tokens:,} train / {info.split('val').tokens:,} held-out tokens "
        f"(vocab {tokenizer.vocab_size}); unigram entropy {unigram_entropy(info):.3f} nats/token")

    torch.manual_seed(train_cfg.seed)
    model = DeepseekV3ForCausalLM(model_cfg).to(device)
    if resolve_precision(train_cfg.precision, torch.device(device)) == "fp8":
        convert_to_fp8_training(model)  # FP8 GEMMs in every linear but the head, and in the routed experts
    if train_cfg.compile:
        for layer in model.model.layers:
            layer.compile()
    precision = resolve_precision(train_cfg.precision, torch.device(device))
    D.parallelize(model, ep_size=ep_size, precision=precision)  # FSDP2 (+ expert parallel) under torchrun
    loader = PackedLoader(info, "train", train_cfg.batch_size, train_cfg.seq_len, seed=train_cfg.seed,
                          rank=rank, world_size=world)
    val = [(x.to(device), y.to(device)) for x, y in
           iter_eval_batches(info, train_cfg.batch_size, train_cfg.seq_len, max_batches=train_cfg.eval_batches,
                             rank=rank, world_size=world)]
    device_key = cost.detect_device()
    dev = cost.get_device(device_key)
    matmul_precision = peak_precision(precision, torch.device(device), dev)
    trainer = Trainer(model, train_cfg, run_dir, loader, lm_loss, stage="pretrain",
                      eval_fn=lambda m: D.all_reduce_mean(held_out_loss(val, m)),
                      flops_per_token=cost.flops_per_token(model_cfg, train_cfg.seq_len),
                      device_name=device_key, peak_flops=dev.peak_flops(matmul_precision))
    if has_state:
        trainer.resume_latest()
        say(f"resumed {run_dir} at step {trainer.step} ({trainer.tokens:,} tokens)")
    n_params = sum(p.numel() for p in model.parameters())
    say(f"model: {n_params / 1e6:.2f}M parameters; training on {device} ({dev.name})"
        + (f" x {world} ranks (FSDP2, expert parallel {ep_size})" if world > 1 else ""))
    if world == 1 and not quiet:  # one probe forward per precision: weights/grads/AdamW/activations per parameter
        say(memory_report(model, train_cfg.batch_size * train_cfg.seq_len))

    t0 = time.perf_counter()
    final = trainer.fit()
    D.export_model(model, run_dir / "model", tokenizer=tokenizer)  # gathered from the shards; rank 0 writes
    receipt = cost.make_receipt(
        "pretrain", device_key, trainer.elapsed, trainer.tokens, trainer.tokens * trainer.flops_per_token,
        precision=matmul_precision, price_per_hour=price_per_hour, steps=trainer.step, params=n_params,
        num_devices=world,
        val_loss=final.get("val_loss"), unigram_entropy=unigram_entropy(info))
    if rank == 0:
        cost.write_receipt(receipt, run_dir / "receipt.json")
    summary = {"run": str(run_dir), "steps": trainer.step, "tokens": trainer.tokens, "loss": final.get("loss"),
               "val_loss": final.get("val_loss"), "wall_seconds": time.perf_counter() - t0, **receipt.to_dict()}
    say(f"done: {trainer.step} steps, {trainer.tokens:,} tokens, held-out loss {final.get('val_loss', math.nan):.4f}, "
        f"{receipt.device_hours:.4f} device-hours, ${receipt.dollars:.4f}; model in {run_dir / 'model'}")
    return summary


def cpu_workers(cap: int = 8) -> int:
    """Data-parallel pretraining processes for this CPU: one per core (at most `cap`).

    Small models use threads poorly: on the 2-core reference machine one single-threaded process trains `tiny`
    at ~850 tokens/s, one two-threaded process at ~950, and two single-threaded ranks under torch.distributed
    (gloo) at ~1,650. So the speedrun runs its pretraining as N one-thread ranks rather than one N-thread process.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cap, cores))


def pretrain_processes(preset: str, run_dir: Path, train: dict[str, Any], data: str, workers: int,
                       price_per_hour: float | None = None, resume: bool = False, quiet: bool = False) -> None:
    """Pretrain as `workers` single-threaded ranks: `torchrun -m nanoseek pretrain` in a child process.
    `train` holds TrainConfig fields; its batch_size is the global batch, split over the ranks."""
    train = {**train, "batch_size": max(1, train["batch_size"] // workers)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={workers}",
           "-m", "nanoseek", "pretrain", "--preset", preset, "--data", data, "--run-dir", str(run_dir)]
    for key, value in train.items():
        cmd += ["--set", f"{key}={value}"]
    if price_per_hour is not None:
        cmd += ["--price", str(price_per_hour)]
    if resume:
        cmd.append("--resume")
    quiet_io = subprocess.DEVNULL if quiet else None
    result = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=quiet_io, stderr=quiet_io)
    if result.returncode != 0:
        raise ChildProcessError(f"pretraining on {workers} processes failed (exit {result.returncode}); rerun "
                                f"the same command to resume it, or see the messages above")
