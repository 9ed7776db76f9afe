"""The `nanoseek` command. Each subcommand is one `_cmd_*` function plus its `_add_*` argument block, in one of:

    train.py   pretrain, sft, grpo, distill, draft-tune, speedrun
    use.py     generate, chat, eval, serve
    tools.py   demo, cost, tokenizer, report, convert
    common.py  the flags several of them share

Errors a user can cause (a missing file, a bad config, a malformed flag) print one line and exit 2; set
NANOSEEK_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys

from nanoseek.cli import tools, train, use
from nanoseek.cli.common import UsageError

__all__ = ["main", "build_parser", "UsageError"]

_COMMANDS = [train._add_speedrun, tools._add_demo, tools._add_cost, tools._add_tokenizer, train._add_pretrain,
             use._add_generate, use._add_chat, tools._add_report, tools._add_convert, train._add_sft, train._add_grpo,
             train._add_distill, train._add_draft_tune, use._add_eval, use._add_serve]


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
