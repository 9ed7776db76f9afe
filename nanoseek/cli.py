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


# ---------------------------------------------------------------------------------------------- main
_COMMANDS = [_add_demo]


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
    except (UsageError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        if os.environ.get("NANOSEEK_DEBUG"):
            raise
        print(f"nanoseek {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
