"""The `nanoseek` command. Each subcommand is one `_cmd_*` function plus its `_add_*` argument block.

Errors a user can cause (a missing file, a bad config, a malformed flag) print one line and exit 2; set
NANOSEEK_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys


class UsageError(Exception):
    """An error the user can fix; its message is the whole story."""


# ---------------------------------------------------------------------------------------------- demo
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build a model from a preset, run it, save it and load it back",
                       description="A one-minute tour of the model: build, forward, save in Hugging Face layout, reload.")
    p.add_argument("--preset", default="tiny", help="model preset (smoke, tiny, dN, deepseek-v3, ...)")
    p.add_argument("--out", default="runs/demo/model", help="where to save the model (Hugging Face layout)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    import time

    import torch

    from nanoseek import preset
    from nanoseek.checkpoint import load_model, save_model
    from nanoseek.model.transformer import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    config = preset(args.preset)
    model = DeepseekV3ForCausalLM(config)
    n = sum(p.numel() for p in model.parameters())
    print(f"built {args.preset}: {n / 1e6:.2f}M parameters, {config.num_hidden_layers} layers, "
          f"{config.n_routed_experts} routed experts (top-{config.num_experts_per_tok}), "
          f"{config.num_nextn_predict_layers} MTP module(s)")
    ids = torch.randint(0, config.vocab_size, (2, 64))
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = model(ids)
    print(f"forward [2, 64] -> logits {list(logits.shape)} in {1e3 * (time.perf_counter() - t0):.1f} ms")
    save_model(model, args.out)
    again = load_model(args.out)
    with torch.no_grad():
        diff = (again(ids) - logits).abs().max().item()
    print(f"saved to {args.out} (config.json + model.safetensors) and reloaded: max |diff| = {diff:.2e}")
    return 0


# ---------------------------------------------------------------------------------------------- cost
def _add_cost(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cost", help="GPU-hours and dollars to train a config on N tokens; DeepSeek's published costs",
                       description="Training cost from FLOPs per token (active parameters + attention): hours and "
                                   "dollars at an MFU or a measured throughput, or the MFU a published GPU-hour "
                                   "figure implies. Token counts accept 14.8T, 500B, 2M, 1e9.")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--preset", help="model preset (smoke, tiny, dN, deepseek-v3, deepseek-v3-16b)")
    model.add_argument("--config", help="a config.json or a model directory")
    p.add_argument("--tokens", help="training tokens, e.g. 14.8T")
    p.add_argument("--device", default="h100",
                   help="device name (h800, h100, h200, a100, b200, rtx4090, cpu; default h100)")
    p.add_argument("--num-devices", default="1", help="devices working together (default 1)")
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--mfu", help="model FLOPs utilisation as a fraction (default 0.4)")
    rate.add_argument("--tokens-per-second", help="measured training throughput over all devices")
    rate.add_argument("--gpu-hours", help="reverse mode: a published device-hour figure; prints the MFU it implies")
    p.add_argument("--seq-len", help="training sequence length (default: the config's pretraining context)")
    p.add_argument("--price", help="USD per device-hour (default: the catalogue's)")
    p.add_argument("--precision", choices=["bf16", "fp8", "fp32"],
                   help="the peak MFU is measured against (default bf16; fp32 on cpu)")
    p.add_argument("--no-mtp", action="store_true", help="leave the MTP modules out of the FLOPs")
    p.add_argument("--devices", help="a devices file (JSON or TOML) overriding peaks and prices")
    p.add_argument("--serve", metavar="TOKENS_PER_SECOND",
                   help="serving mode: USD per 1M output tokens at this output throughput (all devices)")
    p.add_argument("--published", action="store_true",
                   help="print DeepSeek's published cost tables and other cited figures")
    p.add_argument("--list-devices", action="store_true", help="print the device catalogue (measures this CPU)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_cost)


def _cmd_cost(args: argparse.Namespace) -> int:
    import json

    from nanoseek import cost, cost_tables
    from nanoseek.config import ModelConfig, preset

    def show(data: object, text: str) -> int:
        print(json.dumps(data, indent=2) if args.json else text)
        return 0

    def number(flag: str, value: str | None, integer: bool = False) -> float | None:
        if value is None:
            return None
        x = cost.parse_count(value, flag)
        if integer and x != int(x):
            raise UsageError(f"{flag} must be a whole number, got {value}")
        return int(x) if integer else x

    price = None
    if args.price is not None:  # $0 is a fair price (your own machine), so not parse_count, which wants > 0
        try:
            price = float(args.price)
        except ValueError:
            raise UsageError(f"--price {args.price!r} is not a number; give USD per device-hour, e.g. 2.5") from None
        if not price >= 0:
            raise UsageError(f"--price must be non-negative, got {args.price}")

    if args.published:
        pub = cost.published()
        return show(pub, cost_tables.render_published(pub))
    if args.list_devices:
        devices = cost.load_devices(args.devices)
        return show({k: vars(d) for k, d in devices.items()}, cost_tables.render_devices(devices))
    if args.serve is not None:
        dev = cost.get_device(args.device, args.devices)
        k = number("--num-devices", args.num_devices, integer=True)
        price = dev.price_per_hour if price is None else price
        usd = cost.dollars_per_million_output_tokens(number("--serve", args.serve), price * k)
        data = {"device": dev.name, "num_devices": k, "price_per_device_hour": price,
                "output_tokens_per_second": number("--serve", args.serve), "dollars_per_million_output_tokens": usd,
                "deepseek_api_prices": cost.published()["serving"]["api_prices"]}
        api = "; ".join(f"{a['endpoint']}: ${a['output']:.2f}" for a in data["deepseek_api_prices"])
        return show(data, f"{k} x {dev.name} at ${price:.2f}/hour each, {args.serve} output tokens/s: "
                          f"${usd:.2f} per 1M output tokens\nDeepSeek API output prices per 1M: {api}")
    if not (args.preset or args.config):
        raise UsageError("name a model with --preset P or --config FILE (or use --published / --list-devices)")
    if args.tokens is None:
        raise UsageError("give the number of training tokens with --tokens, e.g. --tokens 14.8T")
    cfg = preset(args.preset) if args.preset else ModelConfig.load(args.config)
    est = cost.estimate(
        cfg, number("--tokens", args.tokens), device=args.device,
        num_devices=number("--num-devices", args.num_devices, integer=True),
        seq_len=number("--seq-len", args.seq_len, integer=True), mfu=number("--mfu", args.mfu),
        tokens_per_second=number("--tokens-per-second", args.tokens_per_second),
        gpu_hours=number("--gpu-hours", args.gpu_hours),
        price_per_hour=price,
        precision=args.precision, include_mtp=not args.no_mtp, devices_file=args.devices)
    return show({"model": args.preset or args.config, **est}, cost_tables.render_estimate(est, args.preset or args.config))


# ---------------------------------------------------------------------------------------------- tokenizer
def _add_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer",
                       description="Tokenizer tools. `train` learns a byte-level BPE (digits split one per token) "
                                   "with nanoseek's special tokens and chat template.")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    t = tsub.add_parser("train", help="train on text files, JSONL, parquet or the built-in task corpus",
                        description="Train a tokenizer and save tokenizer.json, tokenizer_config.json and "
                                    "special_tokens_map.json (loadable by transformers.AutoTokenizer).")
    t.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="files or directories (.txt, .md, .jsonl with a 'text' field, .parquet), or 'builtin[:N]'")
    t.add_argument("--vocab-size", type=int, required=True, help="target vocabulary size (may end smaller)")
    t.add_argument("--out", required=True, help="directory to write the tokenizer into")
    t.add_argument("--min-frequency", type=int, default=2, help="least count for a merge (default 2)")
    t.add_argument("--no-split-digits", action="store_true", help="let BPE merge digits (default: one per token)")
    t.add_argument("--seed", type=int, default=0, help="seed for the built-in corpus")
    t.add_argument("--force", action="store_true", help="overwrite a tokenizer already in --out")
    t.set_defaults(func=_cmd_tokenizer_train)
    p.set_defaults(func=lambda args: p.print_help() or 0)


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from nanoseek.data.sources import read_documents
    from nanoseek.tokenizer import Tokenizer

    out = Path(args.out)
    if (out / "tokenizer.json").exists() and not args.force:
        raise UsageError(f"{out} already holds a tokenizer; pass --force to overwrite it or choose another --out")
    count = chars = 0

    def docs():
        nonlocal count, chars
        for text in read_documents(args.data, seed=args.seed):
            count, chars = count + 1, chars + len(text)
            yield text

    t0 = time.perf_counter()
    tok = Tokenizer.train(docs(), args.vocab_size, min_frequency=args.min_frequency,
                          split_digits=not args.no_split_digits)
    if count == 0:
        raise UsageError(f"no documents found in {' '.join(args.data)}; nothing to train on")
    tok.save(out)
    print(f"trained on {count:,} documents ({chars:,} characters) in {time.perf_counter() - t0:.1f}s: "
          f"vocab {tok.vocab_size:,} (asked {args.vocab_size:,}), saved to {out}")
    return 0


# ---------------------------------------------------------------------------------------------- main
# ---------------------------------------------------------------------------------------------- pretrain
def _add_training_flags(p: argparse.ArgumentParser) -> None:
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


def _train_config(args: argparse.Namespace, defaults: dict | None = None):
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


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="pretrain a model (next-token + MTP) on text or the built-in corpus",
                       description="Pretrain from a preset on text/JSONL/parquet files or the built-in reasoning "
                                   "corpus ('builtin'). Trains a tokenizer unless --tokenizer is given, tokenises "
                                   "into shards under the run directory, and writes checkpoints, metrics.jsonl, "
                                   "the final model (Hugging Face layout) and receipt.json.")
    p.add_argument("--preset", default="tiny", help="model preset: smoke, tiny, dN, ... (default tiny)")
    p.add_argument("--data", nargs="+", default=["builtin"], metavar="PATH",
                   help="text/JSONL/parquet files or directories, or 'builtin[:N]' (default builtin)")
    p.add_argument("--tokenizer", help="an existing tokenizer directory (default: train one on the data)")
    _add_training_flags(p)
    p.set_defaults(func=_cmd_pretrain)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from nanoseek.config import preset
    from nanoseek.train.pretrain import DataConfig, pretrain

    train_cfg, model_sets = _train_config(args)
    model_cfg = preset(args.preset).with_overrides(model_sets)
    data = DataConfig(paths=args.data, tokenizer=args.tokenizer)
    pretrain(model_cfg, train_cfg, data, args.run, resume=args.resume, price_per_hour=args.price,
             ep_size=args.ep_size)
    return 0


# ---------------------------------------------------------------------------------------------- generate
def _add_sampling_flags(p: argparse.ArgumentParser, temperature: float, max_tokens: int, top_p: float = 1.0) -> None:
    p.add_argument("model", metavar="MODEL", help="a model directory (Hugging Face layout) or a run directory")
    p.add_argument("--max-tokens", type=int, default=max_tokens, help=f"new tokens per answer (default {max_tokens})")
    p.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature})")
    p.add_argument("--top-p", type=float, default=top_p, help=f"nucleus sampling mass (default {top_p}; 1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default 0 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--thinking-budget", type=int, default=None, help="at most N thinking tokens, then </think> is forced")
    p.add_argument("--min-thinking-tokens", type=int, default=None, help="replace an earlier </think> by 'Wait'")
    p.add_argument("--speculative", action="store_true", help="draft with the MTP module, verify with the model")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="weights dtype (default: as stored)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available, else cpu)")


def _engine_from_args(args: argparse.Namespace, max_batch: int):
    import torch

    from nanoseek.infer.engine import Engine

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    return Engine(args.model, dtype=dtype, device=device, max_batch=max_batch)


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                thinking_budget=args.thinking_budget, min_thinking_tokens=args.min_thinking_tokens,
                speculative=args.speculative)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="batch generation from a prompts file to JSONL",
                       description="Generate an answer for every prompt in FILE (text: one prompt per line; JSONL: "
                                   "objects with \"prompt\" or \"messages\") with continuous batching, and write one "
                                   "JSON object per prompt to --out.")
    _add_sampling_flags(p, temperature=0.0, max_tokens=256)
    p.add_argument("--prompts", required=True, help="prompts file: .txt (one per line) or .jsonl")
    p.add_argument("--out", required=True, help="output JSONL file (written atomically)")
    p.add_argument("--chat", action="store_true", help="wrap text prompts in the chat template")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (default 16)")
    p.set_defaults(func=_cmd_generate)


def _read_prompts(path: str) -> list[tuple[object, bool, dict]]:
    """(prompt, is_chat, the input record) per prompt; JSONL records keep their other fields in the output."""
    import json
    from pathlib import Path

    f = Path(path)
    if not f.is_file():
        raise UsageError(f"prompts file {path} does not exist")
    lines = f.read_text(encoding="utf-8").splitlines()
    if not f.suffix == ".jsonl":
        return [(line, False, {}) for line in lines if line.strip()]
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(f"{path} line {n} is not valid JSON") from None
        if not isinstance(rec, dict) or not ("prompt" in rec or "messages" in rec):
            raise UsageError(f"{path} line {n} needs a \"prompt\" or \"messages\" field")
        rows.append((rec["messages"], True, rec) if "messages" in rec else (rec["prompt"], False, rec))
    return rows


def _cmd_generate(args: argparse.Namespace) -> int:
    import json
    import time

    from nanoseek.checkpoint import atomic_write_text

    rows = _read_prompts(args.prompts)
    if not rows:
        raise UsageError(f"prompts file {args.prompts} holds no prompts")
    engine = _engine_from_args(args, args.max_batch)
    t0 = time.perf_counter()
    # chat and plain prompts may be mixed in one file: run each kind as its own batch, keep the file's order
    outputs: list = [None] * len(rows)
    for chat in (False, True):
        idx = [i for i, (_, c, _) in enumerate(rows) if (c or args.chat) == chat]
        if idx:
            outs = engine.generate([rows[i][0] for i in idx], max_tokens=args.max_tokens, chat=chat, progress=True,
                                   **_sampling_kwargs(args))
            for i, o in zip(idx, outs):
                outputs[i] = o
    elapsed = time.perf_counter() - t0
    lines = []
    for (prompt, _, rec), o in zip(rows, outputs):
        row = {**rec, "prompt": prompt, "text": o.text, "reasoning": o.reasoning, "answer": o.answer,
               "token_ids": o.token_ids, "finish_reason": o.finish_reason, "prompt_tokens": o.prompt_tokens,
               "completion_tokens": len(o.token_ids)}
        if args.speculative:
            row.update(num_drafted=o.num_drafted, num_accepted=o.num_accepted)
        lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    new = sum(len(o.token_ids) for o in outputs)
    msg = f"{len(rows)} prompts, {new} new tokens in {elapsed:.1f}s ({new / elapsed:.1f} tokens/s) -> {args.out}"
    drafted = sum(o.num_drafted for o in outputs)
    if drafted:
        msg += f"; MTP acceptance {sum(o.num_accepted for o in outputs) / drafted:.0%}"
    print(msg)
    return 0


# ---------------------------------------------------------------------------------------------- chat
def _add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="talk to a model in the terminal (streams; thinking shown dimmed)",
                       description="An interactive chat. Commands: /reset (forget the conversation), /budget N "
                                   "(thinking budget; /budget off), /quit. Reads piped stdin too.")
    _add_sampling_flags(p, temperature=0.6, max_tokens=512, top_p=0.95)  # R1's recommended sampling
    p.add_argument("--system", default=None, help="a system message")
    p.set_defaults(func=_cmd_chat)


def _cmd_chat(args: argparse.Namespace) -> int:
    from rich.console import Console

    from nanoseek.infer.engine import END_THINK, THINK

    engine = _engine_from_args(args, max_batch=1)
    if engine.tokenizer is None:
        raise UsageError(f"{args.model} has no tokenizer (tokenizer.json), so it cannot chat; use `nanoseek generate` "
                         f"with token-id prompts")
    console, err = Console(highlight=False), Console(stderr=True, highlight=False)
    interactive = sys.stdin.isatty()
    kwargs = _sampling_kwargs(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    if interactive:
        err.print("[bold]nanoseek chat[/bold] - /reset, /budget N, /quit", markup=True)
    while True:
        try:
            line = console.input("[bold green]you>[/bold green] ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        if not interactive and not line:
            break  # end of piped input
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            messages = list(system)
            err.print("(conversation cleared)")
            continue
        if line.startswith("/budget"):
            value = line.split(maxsplit=1)[1] if len(line.split()) > 1 else ""
            if value == "off":
                kwargs["thinking_budget"] = None
            elif value.isdigit():
                kwargs["thinking_budget"] = int(value)
            else:
                err.print("usage: /budget N or /budget off")
                continue
            if kwargs["min_thinking_tokens"] and kwargs["thinking_budget"] is not None:
                kwargs["min_thinking_tokens"] = min(kwargs["min_thinking_tokens"], kwargs["thinking_budget"])
            err.print(f"(thinking budget: {kwargs['thinking_budget']})")
            continue
        if line.startswith("/"):
            err.print(f"unknown command {line.split()[0]}: use /reset, /budget N or /quit")
            continue
        messages.append({"role": "user", "content": line})
        in_think = False
        console.print("[bold blue]model>[/bold blue] ", end="")
        for delta in engine.stream(messages, max_tokens=args.max_tokens, chat=True, **kwargs):
            # tags are single tokens, so a delta never splits one; colour each piece by the region it is in
            for piece in _split_tags(delta, (THINK, END_THINK)):
                if piece == THINK:
                    in_think = True
                elif piece == END_THINK:
                    in_think = False
                console.print(piece, style="dim" if in_think or piece in (THINK, END_THINK) else None,
                              end="", markup=False, soft_wrap=True)
        console.print()
        out = engine.last_output
        messages.append({"role": "assistant", "content": out.answer or out.text})
    return 0


def _split_tags(text: str, tags: tuple[str, ...]) -> list[str]:
    import re

    return [p for p in re.split("(" + "|".join(map(re.escape, tags)) + ")", text) if p]


# ---------------------------------------------------------------------------------------------- report
def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="a markdown report card with plots: cost per stage, training, evaluations",
                       description="Write report.md and PNG plots for one or more run directories: a cost table per "
                                   "stage shaped like DeepSeek-V3's (device-hours, dollars, and the same FLOPs "
                                   "projected onto one H100), a training summary, evaluations (eval*.json in each "
                                   "run, or --eval), and plots of loss, throughput/MFU, expert load and RL metrics.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories in pipeline order (pretrain sft grpo)")
    p.add_argument("--out", help="directory for report.md and its plots (default: the last RUN_DIR)")
    p.add_argument("--project-to", default="h100", help="device to project every stage's FLOPs onto (default h100)")
    p.add_argument("--mfu", default="0.4", help="MFU assumed for the projection, as a fraction (default 0.4)")
    p.add_argument("--eval", action="append", default=[], metavar="FILE",
                   help="an evaluation summary (nanoseek eval --out) to add to the table; repeatable")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    import shlex

    from nanoseek.report import write_report

    try:
        mfu = float(args.mfu)
    except ValueError:
        raise UsageError(f"--mfu {args.mfu!r} is not a number; give a fraction, e.g. 0.4") from None
    words = list(args.runs) + (["--out", args.out] if args.out else []) + ["--project-to", args.project_to,
                                                                            "--mfu", args.mfu]
    command = "nanoseek report " + shlex.join(words + [w for f in args.eval for w in ("--eval", f)])
    path = write_report(args.runs, args.out, project_to=args.project_to, projection_mfu=mfu,
                        eval_files=args.eval, command=command)
    print(f"wrote {path} and its plots")
    return 0


# ---------------------------------------------------------------------------------------------- convert
def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="rewrite a checkpoint: to DeepSeek's FP8 format (--fp8) or plain bf16/fp32",
                       description="Rewrite a deepseek_v3 checkpoint. With --fp8: every linear except the embedding, "
                                   "lm_head and router as float8_e4m3fn + weight_scale_inv (128x128 blocks) and "
                                   "quantization_config in config.json, as DeepSeek ships V3/R1. Without: plain "
                                   "--dtype weights (an FP8 checkpoint is dequantised). Tokenizer files are copied.")
    p.add_argument("src", metavar="SRC", help="a model directory (Hugging Face layout) or a run directory")
    p.add_argument("dst", metavar="DST", help="the new model directory (written atomically)")
    p.add_argument("--fp8", action="store_true", help="write FP8 weights in the official format")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                   help="dtype of the non-FP8 tensors (all tensors without --fp8); default bf16")
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from nanoseek.fp8_infer import convert_checkpoint

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    out = convert_checkpoint(args.src, args.dst, fp8=args.fp8, dtype=dtype)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out} ({'FP8 e4m3 + 128x128 scales' if args.fp8 else args.dtype}, {size / 2**20:.1f} MiB of weights)")
    return 0


# ---------------------------------------------------------------------------------------------- sft, grpo, distill, eval
def _stage_train_config(args: argparse.Namespace, defaults: dict, epochs_decide: bool = False):
    """TrainConfig for a stage that starts from an existing model (so --set takes training fields only). With
    `epochs_decide`, no --steps/--tokens/--minutes is fine: the stage derives the steps from --epochs."""
    limited = args.steps or args.tokens or args.minutes or any(
        o.split("=", 1)[0] in ("steps", "tokens", "minutes") for o in args.overrides)
    cfg, model_sets = _train_config(args, defaults if limited or not epochs_decide else {**defaults, "steps": 1})
    if epochs_decide and not limited:
        cfg.steps = None
    if model_sets:
        raise UsageError(f"--set {model_sets[0]}: only training fields can be set here (the model exists already)")
    return cfg


def _add_sft(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sft", help="supervised fine-tuning on chat conversations (loss on assistant tokens)",
                       description="Fine-tune a model on a JSONL of OpenAI-format conversations ({\"messages\": "
                                   "[...]}), loss on assistant tokens only, conversations packed whole into rows.")
    p.add_argument("--init", required=True, metavar="MODEL", help="the model to start from (model or run directory)")
    p.add_argument("--data", required=True, metavar="FILE.jsonl", help="conversations: one {\"messages\": [...]} per line")
    p.add_argument("--epochs", type=float, default=3.0,
                   help="passes over the data when no --steps/--tokens/--minutes is given (default 3)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="conversations held out for val_loss (default 0.05)")
    _add_training_flags(p)
    p.set_defaults(func=_cmd_sft)


def _cmd_sft(args: argparse.Namespace) -> int:
    from nanoseek.train.sft import TRAIN_DEFAULTS, sft

    train_cfg = _stage_train_config(args, TRAIN_DEFAULTS, epochs_decide=True)
    sft(args.init, args.data, args.run, train_cfg, resume=args.resume, epochs=args.epochs,
        val_fraction=args.val_fraction, price_per_hour=args.price)
    return 0


def _add_grpo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("grpo", help="reinforcement learning with verifiable rewards (GRPO, Dr. GRPO, DAPO)",
                       description="GRPO from a model: G samples per prompt from the live policy, rewards from the "
                                   "task verifier (or --reward module:function), group-relative advantages, the "
                                   "clipped surrogate with optional k3 KL. Logs reward, accuracy, length, KL, clip "
                                   "fraction, entropy, rollout vs update time, and held-out eval_accuracy.")
    p.add_argument("--init", required=True, metavar="MODEL", help="the model to start from (model or run directory)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", help="task for prompts (train split) and rewards: arithmetic, countdown")
    src.add_argument("--data", metavar="FILE.jsonl", help="prompts: rows {\"prompt\", \"answer\"?, ...}")
    p.add_argument("--difficulty", help="task difficulty, or a mix like 3,4 (default: the task's)")
    p.add_argument("--reward", metavar="MODULE:FUNCTION",
                   help="reward callable (prompts, completions, **columns) -> list[float] (default: the verifier)")
    p.add_argument("--format-weight", type=float, default=0.0,
                   help="verifier reward for a well-formed completion (R1: 1.0, equal to accuracy; default 0)")
    p.add_argument("--group-size", type=int, default=8, help="samples per prompt, G (default 8)")
    p.add_argument("--prompts-per-step", type=int, default=8, help="prompts per rollout batch (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="completion length cap (default 256)")
    p.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="rollout nucleus mass (default 1.0)")
    p.add_argument("--beta", type=float, default=0.0, help="k3 KL weight to the initial model; 0 keeps none (default)")
    p.add_argument("--loss-type", default="dapo", help="grpo | dr_grpo | dapo | bnpo (default dapo, as TRL)")
    p.add_argument("--epsilon", type=float, default=0.2, help="clip range, low side (default 0.2)")
    p.add_argument("--epsilon-high", type=float, default=None, help="clip range, high side (DAPO: 0.28; default = epsilon)")
    p.add_argument("--num-iterations", type=int, default=1, help="optimizer passes per rollout batch (default 1)")
    p.add_argument("--scale-rewards", default=None,
                   help="group | batch | none (default: none for dr_grpo, else group)")
    p.add_argument("--dynamic-sampling", action="store_true",
                   help="drop groups whose rewards are all equal and sample more prompts (DAPO)")
    p.add_argument("--max-sampling-rounds", type=int, default=4, help="generation rounds per batch at most (default 4)")
    p.add_argument("--overlong", default="none", help="truncated completions: none | mask | penalty (default none)")
    p.add_argument("--overlong-buffer", type=int, default=None, help="penalty ramp length in tokens (default max/4)")
    p.add_argument("--eval-num", type=int, default=64, help="held-out problems for eval_accuracy (0 = off; default 64)")
    p.add_argument("--eval-difficulty", default=None, help="difficulty of the held-out problems (default --difficulty)")
    p.add_argument("--max-batch", type=int, default=64, help="sequences the engine decodes together (default 64)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    _add_training_flags(p)
    p.set_defaults(func=_cmd_grpo)


def _cmd_grpo(args: argparse.Namespace) -> int:
    from nanoseek.train.grpo import TRAIN_DEFAULTS, GRPOConfig, grpo

    train_cfg = _stage_train_config(args, TRAIN_DEFAULTS)
    cfg = GRPOConfig(task=args.task, data=args.data, difficulty=args.difficulty, reward=args.reward,
                     format_weight=args.format_weight, group_size=args.group_size,
                     prompts_per_step=args.prompts_per_step, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_p=args.top_p, beta=args.beta, loss_type=args.loss_type,
                     epsilon=args.epsilon, epsilon_high=args.epsilon_high, num_iterations=args.num_iterations,
                     scale_rewards=args.scale_rewards, dynamic_sampling=args.dynamic_sampling,
                     max_sampling_rounds=args.max_sampling_rounds, overlong=args.overlong,
                     overlong_buffer=args.overlong_buffer, eval_num=args.eval_num,
                     eval_difficulty=args.eval_difficulty, max_batch=args.max_batch, seed=args.seed or 0).validate()
    grpo(args.init, args.run, cfg, train_cfg, resume=args.resume, device=args.device, price_per_hour=args.price)
    return 0


def _add_distill(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="distil a teacher's verified reasoning traces into a (smaller) student",
                       description="Rejection sampling + SFT (R1 section 2.4): the teacher answers --num-prompts "
                                   "train prompts --samples times, only verified-correct, well-formed answers are "
                                   "kept (RUN/traces.jsonl), and the student is fine-tuned on them (RUN/student). "
                                   "The student is --student-init (a smaller pretrained model), or a --student-preset "
                                   "pretrained first for --student-pretrain-steps on the built-in corpus with the "
                                   "teacher's tokenizer (a student from scratch learns nothing from a few hundred "
                                   "traces).")
    p.add_argument("--teacher", required=True, metavar="MODEL", help="the teacher (model or run directory)")
    p.add_argument("--task", required=True, help="task for prompts and the verifier: arithmetic, countdown")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--student-init", metavar="MODEL", help="the student to fine-tune (any tokenizer: traces are text)")
    who.add_argument("--student-preset", metavar="P", help="a preset (e.g. d4) to pretrain as the student first")
    p.add_argument("--student-pretrain-steps", type=int, default=300, help="pretraining steps for --student-preset")
    p.add_argument("--difficulty", help="task difficulty or a mix like 3,4 (default: the task's)")
    p.add_argument("--samples", type=int, default=4, help="teacher samples per prompt, K (default 4)")
    p.add_argument("--num-prompts", type=int, default=256, help="train prompts to answer (default 256)")
    p.add_argument("--per-prompt", type=int, default=1, help="distinct correct traces kept per prompt (default 1)")
    p.add_argument("--temperature", type=float, default=0.7, help="teacher sampling temperature (default 0.7)")
    p.add_argument("--max-tokens", type=int, default=512, help="teacher completion cap (default 512)")
    p.add_argument("--epochs", type=float, default=3.0, help="SFT passes over the traces (default 3)")
    _add_training_flags(p)
    p.set_defaults(func=_cmd_distill)


def _cmd_distill(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nanoseek.checkpoint import resolve_model_dir
    from nanoseek.train.sft import TRAIN_DEFAULTS, distill

    if args.samples < 1 or args.num_prompts < 1:
        raise UsageError("--samples and --num-prompts must be >= 1")
    train_cfg = _stage_train_config(args, TRAIN_DEFAULTS, epochs_decide=True)
    teacher = resolve_model_dir(args.teacher)
    student = args.student_init
    if args.student_preset:
        from nanoseek.config import preset
        from nanoseek.train.loop import TrainConfig
        from nanoseek.train.pretrain import DataConfig, pretrain

        base = Path(args.run) / "student_base"
        if not (base / "model" / "config.json").exists():
            pretrain(preset(args.student_preset), TrainConfig(steps=args.student_pretrain_steps, batch_size=16,
                                                              seq_len=256, seed=args.seed or 1337),
                     DataConfig(paths=["builtin"], tokenizer=str(teacher)), base)
        student = base
    distill(teacher, args.run, args.task, student, train_cfg, samples=args.samples, num_prompts=args.num_prompts,
            difficulty=args.difficulty, temperature=args.temperature, max_tokens=args.max_tokens,
            per_prompt=args.per_prompt, epochs=args.epochs, seed=args.seed or 0, price_per_hour=args.price)
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="pass@1, pass@k and maj@k on a task's held-out set or a JSONL file",
                       description="Evaluate a model on N held-out problems of a task (never seen in training) or "
                                   "on a JSONL of {\"prompt\", \"answer\"} rows (exact match of the extracted "
                                   "<answer>). With --samples K > 1: unbiased pass@k and majority-vote maj@k.")
    p.add_argument("model", metavar="MODEL", help="a model directory (Hugging Face layout) or a run directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", help="a task's held-out split: arithmetic, countdown")
    src.add_argument("--data", metavar="FILE.jsonl", help="rows {\"prompt\" (or \"messages\"), \"answer\"}")
    p.add_argument("--num", type=int, default=100, help="held-out problems (default 100)")
    p.add_argument("--difficulty", help="task difficulty or a mix like 3,4 (default: the task's)")
    p.add_argument("--seed", type=int, default=0, help="which held-out set, and the sampling seed (default 0)")
    p.add_argument("--samples", type=int, default=1, help="samples per problem, n (default 1)")
    p.add_argument("--temperature", type=float, default=None, help="default 0 (greedy) for 1 sample, else 0.6")
    p.add_argument("--thinking-budget", type=int, default=None, help="at most N thinking tokens, then </think>")
    p.add_argument("--max-tokens", type=int, default=512, help="completion cap (default 512)")
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together (default 32)")
    p.add_argument("--out", help="write the JSON summary here (atomically)")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from nanoseek.checkpoint import atomic_write_json
    from nanoseek.evaluate import evaluate_rows, evaluate_task, read_eval_jsonl, short

    common = dict(samples=args.samples, temperature=args.temperature, thinking_budget=args.thinking_budget,
                  seed=args.seed, max_tokens=args.max_tokens, max_batch=args.max_batch, progress=True)
    if args.task:
        summary = evaluate_task(args.model, None, args.task, num=args.num, difficulty=args.difficulty, **common)
    else:
        summary = evaluate_rows(args.model, None, read_eval_jsonl(args.data), **common)
    summary["model"] = str(args.model)
    if args.out:
        atomic_write_json(args.out, summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "problems"}))
    print(f"{args.task or args.data}: {short(summary)}" + (f" -> {args.out}" if args.out else ""))
    return 0


# ---------------------------------------------------------------------------------------------- serve (issue 6)
def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server and a chat page at /",
                       description="Serve MODEL over /v1/chat/completions, /v1/completions and /v1/models (OpenAI "
                                   "shapes, SSE streaming), with a chat page at /, /health and /metrics.")
    p.add_argument("model", metavar="MODEL", help="a model directory (Hugging Face layout) or a run directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ (default: none)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (default 16)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429 (default 64)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt (default: the context)")
    p.add_argument("--max-tokens-limit", type=int, default=None, help="largest max_tokens (default: the context)")
    p.add_argument("--price-input", type=float, default=0.28, help="USD per 1M prompt tokens, for usage.cost_usd "
                   "(default 0.28, the DeepSeek API's price)")
    p.add_argument("--price-output", type=float, default=0.42, help="USD per 1M completion tokens (default 0.42)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the directory's name)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="weights dtype (default: as stored)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available, else cpu)")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from nanoseek.checkpoint import resolve_model_dir
    from nanoseek.infer.server import create_app

    resolve_model_dir(args.model)  # a bad path fails here, in one line, before anything binds
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    app = create_app(args.model, api_key=args.api_key, max_batch=args.max_batch, max_queue=args.max_queue,
                     max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
                     max_tokens_limit=args.max_tokens_limit, price_input=args.price_input,
                     price_output=args.price_output, model_name=args.model_name, device=device,
                     dtype=getattr(torch, args.dtype) if args.dtype else None)
    name = app.state.server.model_name
    print(f"serving {name!r} on http://{args.host}:{args.port}/ (chat page at /, API at /v1)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


# ---------------------------------------------------------------------------------------------- speedrun
def _add_speedrun(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("speedrun", help="the whole recipe in one command: pretrain -> SFT -> GRPO -> eval -> report",
                       description="Train a small reasoning model from nothing on the built-in tasks: tokenizer, "
                                   "pretraining (MLA + MoE + MTP), SFT, GRPO, held-out evaluation after each stage, "
                                   "and a report card with the cost. Re-running the same command resumes.")
    p.add_argument("--minutes", type=float, help="wall-clock budget (default 30)")
    p.add_argument("--budget-usd", type=float, help="a dollar budget, turned into time at --device's price")
    p.add_argument("--device", help="device to price the run at (default: this machine's)")
    p.add_argument("--price", type=float, help="dollars per device-hour (default: the catalogue's)")
    p.add_argument("--preset", help="model preset (default: tiny on a CPU; 'smoke' checks the pipeline in minutes)")
    p.add_argument("--task", default="arithmetic", help="the verifiable task to reason about (arithmetic, countdown)")
    p.add_argument("--run", default="runs/speedrun", help="output directory (default runs/speedrun)")
    p.add_argument("--workers", type=int, help="pretraining processes (default on a CPU: one single-threaded "
                                               "process per core, data parallel; 1 = one process)")
    p.set_defaults(func=_cmd_speedrun)


def _cmd_speedrun(args: argparse.Namespace) -> int:
    from nanoseek.speedrun import make_plan, run_speedrun

    if args.minutes is not None and args.budget_usd is not None:
        raise UsageError("give --minutes or --budget-usd, not both")
    plan = make_plan(args.minutes, args.budget_usd, args.device, args.preset, args.task, args.price, args.workers)
    run_speedrun(plan, args.run)
    return 0


_COMMANDS = [_add_speedrun, _add_demo, _add_cost, _add_tokenizer, _add_pretrain, _add_generate, _add_chat, _add_report, _add_convert]
_COMMANDS += [_add_sft, _add_grpo, _add_distill, _add_eval]  # issue 5
_COMMANDS += [_add_serve]  # issue 6


def build_parser() -> argparse.ArgumentParser:
    from nanoseek import __version__

    parser = argparse.ArgumentParser(
        prog="nanoseek",
        description="Train and serve DeepSeek-style reasoning models at any budget, with a receipt for every stage.",
    )
    parser.add_argument("--version", action="version", version=f"nanoseek {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("nanoseek: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, ChildProcessError) as e:
        if os.environ.get("NANOSEEK_DEBUG"):
            raise
        print(f"nanoseek {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
