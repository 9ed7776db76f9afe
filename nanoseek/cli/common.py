"""What several subcommands share: the usage error, the training flags, the sampling flags."""

from __future__ import annotations

import argparse


class UsageError(Exception):
    """An error the user can fix; its message is the whole story."""


def add_training_flags(p: argparse.ArgumentParser) -> None:
    """Flags every training stage shares (pretrain, sft, grpo, distill)."""
    # --run-dir: the same flag under a name torchrun's own parser does not mistake for its --run-path
    p.add_argument("--run", "--run-dir", dest="run", required=True,
                   help="run directory (config, metrics, checkpoints, model, receipt)")
    p.add_argument("--steps", type=int, help="optimizer steps to train")
    p.add_argument("--tokens", type=str, help="tokens to train on (e.g. 5M, 2e6)")
    p.add_argument("--minutes", type=float, help="wall-clock training budget in minutes")
    p.add_argument("--resume", action="store_true", help="continue the run in --run from its latest checkpoint")
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch")
    p.add_argument("--seq-len", type=int, help="tokens per sequence")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--precision", choices=["bf16", "fp32", "fp8"], help="bf16 autocast (default), fp32 or fp8")
    p.add_argument("--fp8", action="store_true", help="same as --precision fp8")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    p.add_argument("--ep-size", type=int, default=1,
                   help="expert parallelism under torchrun: routed experts split over this many ranks (default 1)")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--price", type=float, help="dollars per device-hour for the receipt (default: the catalogue's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model field (e.g. hidden_size=256) or a training field (e.g. warmup_steps=50)")


def train_config(args: argparse.Namespace, defaults: dict | None = None):
    """TrainConfig from defaults, then flags, then the training keys of --set."""
    import dataclasses
    import json

    from nanoseek.cost import parse_count
    from nanoseek.train.loop import TrainConfig

    values = dict(defaults or {})
    flags = {"steps": args.steps, "minutes": args.minutes, "batch_size": args.batch_size, "seq_len": args.seq_len,
             "grad_accum": args.grad_accum, "lr": args.lr, "seed": args.seed, "compile": args.compile or None,
             "precision": "fp8" if args.fp8 else args.precision,
             "tokens": int(parse_count(args.tokens, "--tokens")) if args.tokens else None}
    values.update({k: v for k, v in flags.items() if v is not None})
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    model_sets = []
    for item in args.overrides:
        key, sep, raw = item.partition("=")
        if key in train_fields:
            try:
                values[key] = json.loads(raw)
            except json.JSONDecodeError:
                values[key] = raw
        else:
            model_sets.append(item)
    return TrainConfig(**values).validate(), model_sets


def stage_train_config(args: argparse.Namespace, defaults: dict, epochs_decide: bool = False):
    """TrainConfig for a stage that starts from an existing model (so --set takes training fields only). With
    `epochs_decide`, no --steps/--tokens/--minutes is fine: the stage derives the steps from --epochs."""
    limited = args.steps or args.tokens or args.minutes or any(
        o.split("=", 1)[0] in ("steps", "tokens", "minutes") for o in args.overrides)
    cfg, model_sets = train_config(args, defaults if limited or not epochs_decide else {**defaults, "steps": 1})
    if epochs_decide and not limited:
        if not args.epochs > 0:  # else a zero or negative pass count would still train one step, silently
            raise UsageError(f"--epochs must be > 0, got {args.epochs:g}")
        cfg.steps = None
    if model_sets:
        raise UsageError(f"--set {model_sets[0]}: only training fields can be set here (the model exists already)")
    return cfg


def add_sampling_flags(p: argparse.ArgumentParser, temperature: float, max_tokens: int, top_p: float = 1.0) -> None:
    p.add_argument("model", metavar="MODEL", help="a model directory (Hugging Face layout) or a run directory")
    p.add_argument("--max-tokens", type=int, default=max_tokens, help=f"new tokens per answer (default {max_tokens})")
    p.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature})")
    p.add_argument("--top-p", type=float, default=top_p, help=f"nucleus sampling mass (default {top_p}; 1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default 0 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--thinking-budget", type=int, default=None, help="at most N thinking tokens, then </think> is forced")
    p.add_argument("--min-thinking-tokens", type=int, default=None, help="replace an earlier </think> by 'Wait'")
    p.add_argument("--speculative", action="store_true", help="draft with the MTP modules, verify with the model")
    p.add_argument("--draft-tokens", type=int, default=None,
                   help="with --speculative: tokens drafted per step, one per MTP module in a chain (default: as "
                        "many as the checkpoint has modules)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="weights dtype (default: as stored)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available, else cpu)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="on a GPU, launch every kernel of a decode step instead of replaying recorded steps")
    p.add_argument("--compile", action="store_true", help="torch.compile each layer (a compile per batch shape)")


def engine_from_args(args: argparse.Namespace, max_batch: int):
    import torch

    from nanoseek.infer.engine import Engine

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    return Engine(args.model, dtype=dtype, device=device, max_batch=max_batch,
                  cuda_graphs=False if args.no_cuda_graphs else None, compile=args.compile,
                  draft_tokens=args.draft_tokens)


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                thinking_budget=args.thinking_budget, min_thinking_tokens=args.min_thinking_tokens,
                speculative=args.speculative)
