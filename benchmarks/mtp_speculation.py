"""MTP speculative decoding on a trained checkpoint: plain greedy decoding vs drafting 1..K tokens per step.

    python benchmarks/mtp_speculation.py --model runs/base/model
    python benchmarks/mtp_speculation.py --model runs/mtp2/model runs/drafts/model   # before / after draft-tune
    python benchmarks/mtp_speculation.py --model runs/mtp2/model --device cuda --dtype bfloat16

Batch 1, greedy, held-out task prompts (arithmetic and countdown, the "eval" split, as a trained model of this
project is asked them) in the chat template, up to --max-tokens new tokens each, stopping at the end of the
answer. Each mode decodes every prompt in turn; the modes take turns, --reps times, and each keeps its best
run (a run is a few seconds, at the mercy of anything else on the machine). A speculative mode must produce
exactly the plain tokens. The table splits the speed-up into its two factors: tokens per step (1 + accepted
drafts per step) and what a step costs against a plain one.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek.checkpoint import load_model, resolve_model_dir  # noqa: E402
from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.data.tasks import get_task  # noqa: E402
from nanoseek.infer.engine import Engine  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402
from results_md import publish, set_up  # noqa: E402 (benchmarks/ is the script's directory)

SECTION = "## MTP speculation (issue 4)"
GPU_SECTION = "## MTP speculation on a GPU (issue 4)"


def task_prompts(tokenizer: Tokenizer, n: int) -> list[list[int]]:
    """n held-out prompts, arithmetic and countdown in turn."""
    names = ("arithmetic", "countdown")
    out = []
    for i in range(n):
        task = get_task(names[i % 2])
        out.append(tokenizer.render_chat_ids([{"role": "user", "content": task.prompt(task.sample("eval", i // 2))}]))
    return out


def run(engine: Engine, prompts: list[list[int]], max_tokens: int, speculative: bool, device: str):
    """Decode each prompt alone; -> (seconds, new tokens, outputs)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = [engine.generate([p], max_tokens=max_tokens, temperature=0.0, speculative=speculative)[0] for p in prompts]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, sum(len(o.token_ids) for o in outs), outs


def breakdown(engine: Engine, prompts: list[list[int]], max_tokens: int, speculative: bool) -> tuple[float, ...]:
    """CPU only: one more run with the model's forwards timed -> ms per step in the main model's forward, in the
    MTP modules' forwards, and in everything else (heads, accept rule, bookkeeping)."""
    model, spent = engine.model, {"main": 0.0, "mtp": 0.0}
    originals = {"main": model.hidden_states, "mtp": model.mtp_hidden}

    def timed(name):
        def call(*a, **kw):
            t0 = time.perf_counter()
            out = originals[name](*a, **kw)
            spent[name] += time.perf_counter() - t0
            return out
        return call

    model.hidden_states, model.mtp_hidden = timed("main"), timed("mtp")
    try:
        seconds, tokens, outs = run(engine, prompts, max_tokens, speculative, "cpu")
    finally:
        del model.hidden_states, model.mtp_hidden  # back to the class's methods
    k = engine.draft_tokens if speculative else 1
    steps = sum(o.num_drafted for o in outs) // k + len(outs) if speculative else tokens
    main, mtp = spent["main"] / steps * 1e3, spent["mtp"] / steps * 1e3
    return main, mtp, seconds / steps * 1e3 - main - mtp


def check(name: str) -> Path:
    """-> the model directory, or one line and exit 2 when `name` is not a model with MTP modules and a tokenizer.
    Reads only config.json, so every name is checked before the first timing starts."""
    try:
        directory = resolve_model_dir(name)
        modules = ModelConfig.load(directory).num_nextn_predict_layers
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        print(f"mtp_speculation: {e}")
        raise SystemExit(2)
    if not modules or not (directory / "tokenizer.json").is_file():
        print(f"mtp_speculation: {directory} needs MTP modules and a tokenizer; give a model trained by "
              f"`nanoseek pretrain` (its run's model/ directory)")
        raise SystemExit(2)
    return directory


def load(name: str, dtype: str, device: str):
    """-> (directory, model, tokenizer); exit 2 as `check` does, also when the weights hold no MTP modules."""
    directory = check(name)
    try:
        model = load_model(directory, dtype=getattr(torch, dtype), device=device)
    except (FileNotFoundError, ValueError) as e:
        print(f"mtp_speculation: {e}")
        raise SystemExit(2)
    if not model.mtp_modules:  # (config.json named them but the weights lack them: transformers drops them)
        print(f"mtp_speculation: {directory} holds no MTP module weights; give a model trained by `nanoseek pretrain`")
        raise SystemExit(2)
    return directory, model, Tokenizer.load(directory)


def measure(name: str, args: argparse.Namespace) -> tuple[list[str], float]:
    """One model's tables (markdown lines) and its best speed-up."""
    directory, model, tokenizer = load(name, args.dtype, args.device)
    prompts = task_prompts(tokenizer, args.prompts)
    modes = [0] + list(range(1, len(model.mtp_modules) + 1))  # drafts per step; 0 = plain decoding
    engines = {k: Engine(model, tokenizer=tokenizer, max_batch=1, draft_tokens=max(k, 1)) for k in modes}
    for k in modes:  # warm-up: every shape (and on a GPU every recorded graph) the timed runs need
        run(engines[k], prompts, args.max_tokens, k > 0, args.device)
    best: dict[int, tuple[float, int, list]] = {}
    for _ in range(args.reps):
        for k in modes:
            seconds, tokens, outs = run(engines[k], prompts, args.max_tokens, k > 0, args.device)
            if k not in best or tokens / seconds > best[k][1] / best[k][0]:
                best[k] = (seconds, tokens, outs)

    parts = {} if args.device.startswith("cuda") else {k: breakdown(engines[k], prompts, args.max_tokens, k > 0)
                                                        for k in modes}
    plain_s, plain_tokens, plain_outs = best[0]
    plain_tps, plain_step = plain_tokens / plain_s, plain_s / plain_tokens * 1e3
    rows = []
    for k in modes[1:]:
        seconds, tokens, outs = best[k]
        drafted, accepted = sum(o.num_drafted for o in outs), sum(o.num_accepted for o in outs)
        steps = drafted // k + len(outs)  # verify steps + each prompt's first token (from the prefill)
        same = all(o.token_ids == p.token_ids for o, p in zip(outs, plain_outs))
        rows.append((k, accepted / drafted, tokens / steps, seconds / steps * 1e3, tokens / seconds, same))
        print(f"{name}, {k} draft(s)/step: acceptance {accepted / drafted:.1%}, {tokens / steps:.2f} tokens/step, "
              f"{seconds / steps * 1e3:.2f} ms/step, {tokens / seconds:.1f} tok/s vs plain {plain_tps:.1f} "
              f"(x{tokens / seconds / plain_tps:.2f}), identical: {same}", flush=True)

    cfg = model.config
    lines = [
        f"Model: `{name}` ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"{cfg.num_hidden_layers} layers, {len(model.mtp_modules)} MTP module(s)); {plain_tokens} new tokens in all.",
        "",
        "| drafts per step | acceptance | tokens per step | ms per step | tok/s | speed-up | identical output |",
        "|---|---|---|---|---|---|---|",
        f"| none (plain) | | 1.00 | {plain_step:.2f} | {plain_tps:.1f} | 1.00x | |",
        *[f"| {k} | {a:.1%} | {t:.2f} | {ms:.2f} ({ms / plain_step:.2f}x plain) | {tps:.1f} | "
          f"**{tps / plain_tps:.2f}x** | {same} |" for k, a, t, ms, tps, same in rows],
        "",
    ]
    if parts:
        lines += [
            "Where a step's time goes (one more run per mode with the forwards timed; ms per step):", "",
            "| drafts per step | main model forward | MTP modules | the rest | best speed-up if every draft passed |",
            "|---|---|---|---|---|",
            *[f"| {k or 'none (plain)'} | {m:.2f} ({k + 1} token{'s' * (k > 0)} per row) | {d:.2f} | {r:.2f} | "
              + (f"{(k + 1) / ((m + d + r) / sum(parts[0])):.2f}x |" if k else "|")
              for k, (m, d, r) in parts.items()],
            "",
        ]
    return lines, max(tps / plain_tps for *_, tps, _ in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, nargs="+",
                    help="trained model directories with MTP weights and a tokenizer (several: e.g. before and "
                         "after `nanoseek draft-tune`, measured one after the other)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--prompts", type=int, default=8, help="held-out prompts, decoded one at a time (default 8)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3, help="timed runs per mode, in turns, best kept (default 3)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update benchmarks/RESULTS.md")
    args = ap.parse_args()
    if not set_up("mtp_speculation", args.device, args.threads):
        raise SystemExit(2)
    for name in args.model:  # before the first timing: a bad name costs nothing
        check(name)
    gpu = args.device.startswith("cuda")
    device = torch.cuda.get_device_name() if gpu else (platform.processor() or platform.machine())
    lines = [
        GPU_SECTION if gpu else SECTION, "",
        f"`python benchmarks/mtp_speculation.py {' '.join(sys.argv[1:])}`",
        "",
        f"Machine: {device}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}, {args.dtype}. "
        f"Batch 1, greedy, {args.prompts} held-out task prompts (arithmetic and countdown in turn) decoded one at a "
        f"time, up to {args.max_tokens} new tokens each; the modes take turns {args.reps} times, best run kept.",
        "",
    ]
    best = 0.0
    for name in args.model:
        tables, speedup = measure(name, args)
        lines += tables
        best = max(best, speedup)
    lines += [
        "Speed-up = tokens per step / (ms per step / plain ms per step). Acceptance = accepted drafts / drafted "
        "(a chain stops at its first rejected draft, so the drafts after it count as drafted, not accepted).",
        "",
        f"Target >= 1.5x: **{'met' if best >= 1.5 else 'not met'}** (best {best:.2f}x).", "",
    ]
    publish(GPU_SECTION if gpu else SECTION, "\n".join(lines), write=not args.no_write)


if __name__ == "__main__":
    main()
