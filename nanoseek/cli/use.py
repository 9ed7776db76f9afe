"""Using a model: generate, chat, eval and serve."""

from __future__ import annotations

import argparse
import sys

from nanoseek.cli.common import UsageError, add_sampling_flags, engine_from_args, sampling_kwargs

# ---------------------------------------------------------------------------------------------- generate
def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="batch generation from a prompts file to JSONL",
                       description="Generate an answer for every prompt in FILE (text: one prompt per line; JSONL: "
                                   "objects with \"prompt\" or \"messages\") with continuous batching, and write one "
                                   "JSON object per prompt to --out.")
    add_sampling_flags(p, temperature=0.0, max_tokens=256)
    p.add_argument("--prompts", required=True, help="prompts file: .txt (one per line) or .jsonl")
    p.add_argument("--out", required=True, help="output JSONL file (written atomically)")
    p.add_argument("--chat", action="store_true", help="wrap text prompts in the chat template")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (default 16)")
    p.set_defaults(func=_cmd_generate)


def read_prompts(path: str) -> list[tuple[object, bool, dict]]:
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

    rows = read_prompts(args.prompts)
    if not rows:
        raise UsageError(f"prompts file {args.prompts} holds no prompts")
    engine = engine_from_args(args, args.max_batch)
    t0 = time.perf_counter()
    outputs = engine.generate_mixed([(prompt, chat or args.chat) for prompt, chat, _ in rows],
                                    max_tokens=args.max_tokens, progress=True, **sampling_kwargs(args))
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
    add_sampling_flags(p, temperature=0.6, max_tokens=512, top_p=0.95)  # R1's recommended sampling
    p.add_argument("--system", default=None, help="a system message")
    p.set_defaults(func=_cmd_chat)


def _cmd_chat(args: argparse.Namespace) -> int:
    from rich.console import Console

    from nanoseek.tokenizer import END_THINK, THINK

    engine = engine_from_args(args, max_batch=1)
    if engine.tokenizer is None:
        raise UsageError(f"{args.model} has no tokenizer (tokenizer.json), so it cannot chat; use `nanoseek generate` "
                         f"with token-id prompts")
    console, err = Console(highlight=False), Console(stderr=True, highlight=False)
    interactive = sys.stdin.isatty()
    kwargs = sampling_kwargs(args)
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


# ---------------------------------------------------------------------------------------------- eval
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
    p.add_argument("--temperature", type=float, default=None,
                   help="default 0 (greedy) for 1 sample, else 0.6 (R1's evaluation setting)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling; default 0.95 when sampling (R1)")
    p.add_argument("--thinking-budget", type=int, default=None, help="at most N thinking tokens, then </think>")
    p.add_argument("--max-tokens", type=int, default=512, help="completion cap (default 512)")
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together (default 32)")
    p.add_argument("--out", help="write the JSON summary here (atomically)")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from nanoseek.checkpoint import atomic_write_json
    from nanoseek.evaluate import evaluate_rows, evaluate_task, read_eval_jsonl, short

    common = dict(samples=args.samples, temperature=args.temperature, top_p=args.top_p,
                  thinking_budget=args.thinking_budget, seed=args.seed, max_tokens=args.max_tokens,
                  max_batch=args.max_batch, progress=True)
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


# ---------------------------------------------------------------------------------------------- serve
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
    p.add_argument("--draft-tokens", type=int, default=None,
                   help="for requests with \"speculative\": true, tokens drafted per step by the MTP modules in a "
                        "chain (default: as many as the checkpoint has modules)")
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
                     dtype=getattr(torch, args.dtype) if args.dtype else None, draft_tokens=args.draft_tokens)
    name = app.state.server.model_name
    print(f"serving {name!r} on http://{args.host}:{args.port}/ (chat page at /, API at /v1)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
