"""Around training: the demo, the cost calculator, the tokenizer, the report card and checkpoint conversion."""

from __future__ import annotations

import argparse

from nanoseek.cli.common import UsageError

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
