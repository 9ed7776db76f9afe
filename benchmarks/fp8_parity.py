"""FP8 parity: the same pretraining run in bf16 and in FP8, then FP8 weights for inference.

Part 1 (training): `nanoseek.train.pretrain.pretrain` with the same seed, tokenizer, data and steps in precision
"bf16" (the issue's baseline: bf16 autocast; this CPU has no bf16 GEMM, so the products are computed the way
autocast rounds them, by fp32 kernels, see nanoseek/model/linear.py), "fp8" (every linear but the head, and the
routed experts, through FP8 GEMMs: 1x128 activation/gradient tiles, 128x128 weight blocks, emulated on CPU; the
rest under the same bf16 autocast, as in DeepSeek's recipe) and "fp32" (the full-precision reference), plus fp32
with a second seed to show how far runs drift apart from the seed alone. The runs go side by side, one process
and one thread each. Reported: each final held-out loss, the relative difference of fp8 from bf16 (target <= 1%;
DeepSeek: < 0.25%), and the training losses paired step by step (same batches, so batch noise cancels).

Part 2 (inference): the fp32 run's final model, stored in bf16 (the reference) and converted to the official FP8
format (`nanoseek convert --fp8`), loaded with FP8 weights in memory (`load_fp8_model`). Reported: weight bytes
(FP8 / bf16, target <= 55%) and greedy agreement on held-out prompts. Both models compute in fp32 here: the
comparison isolates the weight format.

    python benchmarks/fp8_parity.py                                   # tiny, 400 steps x 16: ~2 h on 2 cores
    python benchmarks/fp8_parity.py --keep                            # reuse finished runs in --out
    python benchmarks/fp8_parity.py --preset smoke --steps 60 --docs 4000 --no-write   # a 1-2 minute check
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from nanoseek.checkpoint import load_model, save_model
from nanoseek.config import preset
from nanoseek.data.shards import iter_eval_batches, load_shards
from nanoseek.fp8_infer import convert_checkpoint, load_fp8_model, weight_bytes
from nanoseek.report import read_metrics
from nanoseek.train.loop import TrainConfig
from nanoseek.train.pretrain import DataConfig, prepare_tokenizer, pretrain
from results_md import write_section  # noqa: E402 (benchmarks/ is the script's directory)

SECTION = "FP8 (issue 7)"


@torch.no_grad()
def greedy(model, prompts: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy continuation by full recomputation (no cache: the simplest possible reference)."""
    ids = prompts
    for _ in range(n):
        ids = torch.cat((ids, model(ids)[:, -1].argmax(-1, keepdim=True)), dim=1)
    return ids[:, prompts.shape[1]:]


def agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(fraction of sequences identical, mean fraction of tokens before the first divergence)."""
    same = (a == b)
    prefix = same.int().cumprod(dim=1).sum(dim=1).float() / a.shape[1]
    return float(same.all(dim=1).float().mean()), float(prefix.mean())


def train_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl")[0] if "loss" in r and "step" in r}


def paired_gaps(base: Path, other: Path, windows: int = 8) -> list[tuple[int, int, float]]:
    """(first step, last step, mean(other - base) / mean(base)) of the training loss per window of steps. Runs
    with the same seed see the same batches, so this difference is paired: the batch-to-batch noise cancels,
    which a single final held-out figure cannot do."""
    a, b = train_losses(base), train_losses(other)
    steps = sorted(a.keys() & b.keys())
    windows = max(1, min(windows, len(steps)))
    out = []
    for i in range(windows):  # equal windows covering every step
        w = steps[i * len(steps) // windows:(i + 1) * len(steps) // windows]
        out.append((w[0], w[-1], sum(b[k] - a[k] for k in w) / sum(a[k] for k in w)))
    return out


def finished(run: Path, steps: int) -> bool:
    """A run this script completed earlier with the same number of steps (its receipt is written last)."""
    path = run / "receipt.json"
    return path.is_file() and json.loads(path.read_text())["extra"].get("steps") == steps


def recorded(run: Path) -> tuple[float, float]:
    """(final held-out loss, wall seconds) of a finished run, from its receipt."""
    receipt = json.loads((run / "receipt.json").read_text())
    return receipt["extra"]["val_loss"], receipt["wall_seconds"]


def seed_list(text: str) -> list[int]:
    """'7,11' -> [7, 11]; argparse turns the ValueError of a malformed list into a one-line usage error."""
    return [int(s) for s in text.split(",") if s.strip()]


def run_name(precision: str, seed: int, main_seed: int) -> str:
    return precision if seed == main_seed else f"{precision}-seed{seed}"


def train_one(job: dict) -> None:
    """One pretraining run in its own process with one thread; its receipt holds the result (see `recorded`)."""
    torch.set_num_threads(1)
    cfg = TrainConfig(steps=job["steps"], batch_size=job["batch_size"], seq_len=job["seq_len"],
                      precision=job["precision"], seed=job["seed"], eval_every=job["steps"], checkpoint_every=10**9,
                      eval_batches=8)
    pretrain(preset(job["preset"]), cfg, DataConfig(builtin_docs=job["docs"], tokenizer=job["tokenizer"]), job["run"],
             quiet=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--docs", type=int, default=60_000, help="documents of the built-in corpus")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--noise-seed", type=int, default=7, help="a second fp32 run's seed: the run-to-run spread")
    ap.add_argument("--pair-seeds", type=seed_list, default=[7],
                    help="comma list: more bf16/fp8 pairs at these seeds ('' for none)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="runs trained side by side, one thread each (default: one per core)")
    ap.add_argument("--prompts", type=int, default=32, help="held-out prompts for greedy agreement")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen", type=int, default=32, help="greedy tokens per prompt")
    ap.add_argument("--out", default="runs/fp8_parity")
    ap.add_argument("--results", default="benchmarks/RESULTS.md")
    ap.add_argument("--section", default=SECTION,
                    help="the RESULTS.md section (its `## ` heading) this configuration writes")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--keep", action="store_true", help="reuse runs in --out that finished with the same --steps")
    args = ap.parse_args()
    if args.steps < 1 or not args.section.strip():
        ap.error("--steps must be >= 1 and --section must name a section")

    out = Path(args.out)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    if not (out / "tokenizer").is_dir():  # one tokenizer for every run: all of them see identical token streams
        prepare_tokenizer(DataConfig(builtin_docs=args.docs, tokenizer_docs=min(20_000, args.docs)), out,
                          preset(args.preset).vocab_size)
    pair_seeds = args.pair_seeds
    jobs = [("bf16", args.seed), ("fp8", args.seed), ("fp32", args.seed), ("fp32", args.noise_seed)]
    jobs += [(p, s) for s in pair_seeds for p in ("bf16", "fp8")]
    runs = [out / run_name(p, s, args.seed) for p, s in jobs]
    todo = [i for i, run in enumerate(runs) if not (args.keep and finished(run, args.steps))]
    workers = max(1, min(args.workers, len(todo)))
    print(f"{len(jobs)} runs ({', '.join(f'{p} seed {s}' for p, s in jobs)}); training {len(todo)}, {workers} at a "
          f"time, one thread each")
    common = dict(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, docs=args.docs,
                  preset=args.preset, tokenizer=str(out / "tokenizer"))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(train_one, [dict(common, precision=jobs[i][0], seed=jobs[i][1], run=str(runs[i]))
                                  for i in todo]))
    done = [recorded(run) for run in runs]
    for (precision, seed), (loss, wall) in zip(jobs, done):
        print(f"{precision} seed {seed}: held-out loss {loss:.4f} after {args.steps} steps ({wall:.0f} s)")
    (bf16_loss, _), (fp8_loss, _), (fp32_loss, _), (noise_loss, _) = done[:4]
    pairs = [(args.seed, bf16_loss, fp8_loss)] + [(s, done[4 + 2 * i][0], done[5 + 2 * i][0])
                                                  for i, s in enumerate(pair_seeds)]
    rel = (fp8_loss - bf16_loss) / bf16_loss  # signed: below zero, FP8 ended lower (better) than bf16
    spread = abs(noise_loss - fp32_loss) / fp32_loss
    print(f"relative difference fp8 vs bf16 {100 * rel:+.3f}% (target: within 1%); fp32 seed to seed: "
          f"{100 * spread:.3f}%")

    # ---------------------------------------------------------------- FP8 weights for inference
    fp32_run = out / "fp32"
    save_model(load_model(fp32_run / "model", dtype=torch.bfloat16), out / "weights_bf16")
    convert_checkpoint(out / "weights_bf16", out / "weights_fp8", fp8=True)
    ref = load_model(out / "weights_bf16", dtype=torch.bfloat16)
    bf16_bytes = weight_bytes(ref)
    ref = ref.float()  # bf16 weights, fp32 arithmetic (see the docstring)
    fp8 = load_fp8_model(out / "weights_fp8", dtype=torch.bfloat16)
    fp8_bytes = weight_bytes(fp8)
    fp8 = fp8.float()  # casts embedding/head/norms to fp32 for the arithmetic; FP8 payloads stay FP8
    info = load_shards(fp32_run / "data")
    val = torch.cat([x for x, _ in iter_eval_batches(info, args.prompts, args.prompt_len, max_batches=1)])
    a, b = greedy(ref, val, args.gen), greedy(fp8, val, args.gen)
    exact, prefix = agreement(a, b)
    print(f"weights: bf16 {bf16_bytes / 2**20:.2f} MiB, FP8 {fp8_bytes / 2**20:.2f} MiB "
          f"({100 * fp8_bytes / bf16_bytes:.1f}% of bf16); greedy: {100 * exact:.1f}% of {len(val)} continuations "
          f"identical, {100 * prefix:.1f}% of tokens before the first divergence")

    bf16_run, fp8_run, _, noise_run = runs[:4]
    columns = [("fp8 - bf16", paired_gaps(bf16_run, fp8_run)), ("bf16 - fp32", paired_gaps(fp32_run, bf16_run)),
               ("fp8 - fp32", paired_gaps(fp32_run, fp8_run)),
               (f"fp32 seed {args.noise_seed} - fp32", paired_gaps(fp32_run, noise_run))]
    columns += [(f"fp8 - bf16, seed {s}", paired_gaps(runs[4 + 2 * i], runs[5 + 2 * i]))
                for i, s in enumerate(pair_seeds)]
    pair_rows = "\n".join(f"| {s} | {b:.4f} | {f:.4f} | {100 * (f - b) / b:+.2f}% |" for s, b, f in pairs)
    rels = [(f - b) / b for _, b, f in pairs]
    mean_rel = sum(rels) / len(rels)
    # The standard error of that mean: how far the pairs' own scatter leaves it from the true precision effect.
    sem = (sum((r - mean_rel) ** 2 for r in rels) / (len(rels) - 1) / len(rels)) ** 0.5 if len(rels) > 1 else None
    sem_text = f" (standard error {100 * sem:.2f} points)" if sem is not None else ""
    mean_verdict = "**met**" if abs(mean_rel) <= 0.01 else "**not met**"
    gap_rows = "\n".join(f"| {lo}-{hi} | " + " | ".join(f"{100 * gaps[i][2]:+.2f}%" for _, gaps in columns) + " |"
                         for i, (lo, hi, _) in enumerate(columns[0][1]))
    fp8_gaps, noise_gaps = columns[0][1], columns[3][1]
    late = fp8_gaps[len(fp8_gaps) // 2:]
    late_noise = max(abs(n) for _, _, n in noise_gaps[len(noise_gaps) // 2:])
    paired = (f"Over the second half of training FP8's training loss differs from bf16's by "
              f"{', '.join(f'{100 * g:+.2f}%' for _, _, g in late)} per window (same batches), while a second fp32 "
              f"seed strays up to {100 * late_noise:.2f}% from the first.")
    walls = {run.name: f"{w:.0f}" for run, (_, w) in zip(runs, done)}
    verdict = "**met**" if abs(rel) <= 0.01 else "**not met**"
    direction = "lower (better)" if rel < 0 else "higher (worse)"
    heading = f"## {args.section}"
    text = f"""{heading}

`python benchmarks/fp8_parity.py {" ".join(sys.argv[1:])}` on {platform.processor() or platform.machine()}, \
one thread per run, torch {torch.__version__}. FP8 is the CPU emulation (quantise to e4m3 with DeepSeek's scales, \
multiply in fp32); bf16 is autocast with its products computed by fp32 kernels from bf16-rounded operands (this CPU \
has no bf16 GEMM). The Hopper speed target (FP8 >= 1.3x bf16 tokens/s) is measured on a GPU by \
`benchmarks/fp8_speed.py` ("FP8 training speed on a GPU").

| run (seed) | held-out loss | wall (s), one thread (shared cores: an upper bound) |
|---|---|---|
| bf16 ({args.seed}): the baseline (bf16 autocast) | {bf16_loss:.4f} | {walls["bf16"]} |
| fp8 ({args.seed}): all linears but the head + routed experts in FP8 (1x128 / 128x128), the rest as bf16 | \
{fp8_loss:.4f} | {walls["fp8"]} |
| fp32 ({args.seed}): full precision | {fp32_loss:.4f} | {walls["fp32"]} |
| fp32 ({args.noise_seed}): another seed | {noise_loss:.4f} | {walls[noise_run.name]} |

Relative difference of the final held-out loss, fp8 against bf16: **{100 * rel:+.3f}%**, FP8 {direction} (target: \
within 1%, {verdict}; DeepSeek reports < 0.25%). bf16 against fp32: {100 * (bf16_loss - fp32_loss) / fp32_loss:+.3f}%; \
the seed alone moves fp32 by {100 * spread:.3f}%.

Every bf16/fp8 pair (each pair shares its seed, so its initialisation and batches):

| seed | bf16 | fp8 | fp8 against bf16 |
|---|---|---|---|
{pair_rows}

Mean relative difference over the {len(pairs)} pairs: **{100 * mean_rel:+.2f}%**{sem_text}; within 1%: {mean_verdict}.

The training loss, paired step by step (mean difference over each window / the second run's mean; the runs with
seed {args.seed} see exactly the same batches, the other seed does not):

| steps | {" | ".join(name for name, _ in columns)} |
|---|{"---|" * len(columns)}
{gap_rows}

{paired}

FP8 weights for inference (the fp32 run's model; bf16 reference vs `nanoseek convert --fp8` loaded with
`load_fp8_model`, both computing in fp32): weights {fp8_bytes / 2**20:.2f} MiB vs {bf16_bytes / 2**20:.2f} MiB =
**{100 * fp8_bytes / bf16_bytes:.1f}% of bf16** (target <= 55%); greedy decoding of {len(val)} held-out prompts
({args.prompt_len} tokens, {args.gen} new): {100 * exact:.1f}% of continuations identical, {100 * prefix:.1f}% of
tokens generated before the first divergence.
"""
    if not args.no_write:
        write_section(heading, text, Path(args.results))
        print(f"wrote {heading!r} in {args.results}")
    else:
        print(text)


if __name__ == "__main__":
    main()
