"""R1-Zero on a CPU, end to end: pretrain tiny -> find the edge of competence -> eval -> GRPO -> eval -> curves,
then test-time scaling (accuracy vs thinking budget) and distillation into a smaller student. Writes the
`## R1-Zero on a CPU (issue 5)` section of benchmarks/RESULTS.md (only that section) and PNGs next to it.

    python benchmarks/r1_zero_cpu.py                       # the real run (~95 min on a 2-core laptop)
    python benchmarks/r1_zero_cpu.py --smoke --no-write    # a 1-2 minute check that every phase runs
    python benchmarks/r1_zero_cpu.py --phases grpo,tts --out runs/r1zero   # reuse the pretrained model

The edge of competence (REFERENCE 4.10): after pretraining, greedy pass@1 is measured at each difficulty on a
small probe set, and GRPO trains at the hardest difficulty whose pass@1 is still >= --edge-min (default 0.1):
harder than most of the pretraining mix, yet with enough right answers in a group of G samples to learn from.
Every phase reuses what an earlier run left in --out, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from nanoseek.atomic import atomic_write_text
from nanoseek.checkpoint import atomic_write_json
from nanoseek.config import preset
from nanoseek.data.tasks import conversation, get_task
from nanoseek.evaluate import evaluate_task
from nanoseek.train.grpo import TRAIN_DEFAULTS as GRPO_DEFAULTS
from nanoseek.train.grpo import GRPOConfig, grpo
from nanoseek.train.loop import TrainConfig
from nanoseek.train.pretrain import DataConfig, cpu_workers, pretrain, pretrain_processes
from nanoseek.train.sft import TRAIN_DEFAULTS as SFT_DEFAULTS
from nanoseek.train.sft import distill, sft
from results_md import RESULTS, write_section  # noqa: E402 (benchmarks/ is the script's directory)

SECTION = "## R1-Zero on a CPU (issue 5)"
HERE = Path(__file__).resolve().parent


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/r1zero", help="working directory (runs, evals); reused when present")
    p.add_argument("--phases", default="pretrain,grpo,tts,distill", help="comma list of phases to run")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--task", default="arithmetic")
    p.add_argument("--pretrain-minutes", type=float, default=30.0)
    p.add_argument("--pretrain-workers", type=int, default=cpu_workers(),
                   help="pretraining processes, one thread each (default: one per core)")
    p.add_argument("--data", default=None, help="pretraining data (default: 40K built-in documents of --task)")
    p.add_argument("--grpo-minutes", type=float, default=20.0)
    p.add_argument("--difficulty", default=None, help="GRPO difficulty (default: found by the edge probe)")
    p.add_argument("--edge-min", type=float, default=0.1, help="least probe pass@1 for the edge difficulty")
    p.add_argument("--probe-num", type=int, default=40, help="problems per difficulty in the edge probe")
    p.add_argument("--eval-num", type=int, default=200, help="held-out problems for before/after")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--lr", type=float, default=GRPO_DEFAULTS["lr"])
    p.add_argument("--loss-type", default="grpo")
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--grpo-eval-every", type=int, default=5)
    p.add_argument("--grpo-eval-num", type=int, default=64)
    p.add_argument("--budgets", default="0,8,16,32,64,128,256", help="thinking budgets for test-time scaling")
    p.add_argument("--student-preset", default="d3")
    p.add_argument("--student-minutes", type=float, default=8.0, help="student pretraining budget")
    p.add_argument("--distill-prompts", type=int, default=256)
    p.add_argument("--distill-samples", type=int, default=4)
    p.add_argument("--distill-lr", type=float, default=1e-3, help="the student's SFT peak lr")
    p.add_argument("--distill-epochs", type=float, default=10.0, help="the student's SFT passes over the traces")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--smoke", action="store_true", help="tiny budgets and the smoke preset: checks the plumbing")
    p.add_argument("--no-write", action="store_true", help="do not touch benchmarks/RESULTS.md")
    a = p.parse_args()
    a.data = a.data or f"builtin:40000:{a.task}"
    if a.smoke:
        a.preset, a.pretrain_minutes, a.grpo_minutes, a.student_preset = "smoke", 0.15, 0.3, "smoke"
        a.student_minutes, a.probe_num, a.eval_num, a.grpo_eval_num, a.grpo_eval_every = 0.1, 4, 8, 4, 2
        a.group_size, a.prompts_per_step, a.max_new_tokens, a.pretrain_workers = 4, 2, 32, 1
        a.budgets, a.distill_prompts, a.distill_samples, a.data = "0,8,32", 8, 2, "builtin:1000"
        if a.out == "runs/r1zero":
            a.out = "runs/r1zero-smoke"
    return a


def log(msg: str) -> None:
    print(f"[r1zero {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cached(path: Path, fn):
    """JSON result of fn(), stored at path; an existing file is reused (so a rerun continues)."""
    if path.exists():
        return json.loads(path.read_text())
    out = fn()
    atomic_write_json(path, out)
    return out


def slim(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "problems"}


# ============================================================================ phases
def phase_pretrain(a, out: Path) -> Path:
    run = out / "pretrain"
    if (run / "model" / "config.json").exists():
        log(f"reusing {run}/model")
        return run / "model"
    log(f"pretraining {a.preset} for {a.pretrain_minutes} min on the built-in corpus, {a.pretrain_workers} process(es)")
    train = dict(minutes=a.pretrain_minutes, batch_size=16, seq_len=256)
    resume = (run / "config.json").exists()
    if a.pretrain_workers > 1:
        pretrain_processes(a.preset, run, train, a.data, a.pretrain_workers, resume=resume)
    else:
        pretrain(preset(a.preset), TrainConfig(**train), DataConfig(paths=[a.data]), run, resume=resume)
    return run / "model"


def edge_difficulty(a, model: Path, out: Path) -> tuple[str, dict]:
    task = get_task(a.task)
    probe = cached(out / "edge_probe.json", lambda: {
        str(d): evaluate_task(str(model), None, task, num=a.probe_num, difficulty=d, seed=1,
                              max_tokens=a.max_new_tokens)["pass@1"] for d in task.DIFFICULTIES})
    log(f"edge probe (greedy pass@1 by difficulty): {probe}")
    if a.difficulty:
        return a.difficulty, probe
    ok = [int(d) for d, acc in probe.items() if acc >= a.edge_min]
    return str(max(ok) if ok else min(int(d) for d in probe)), probe


def phase_grpo(a, model: Path, out: Path, difficulty: str) -> dict:
    run = out / "grpo"
    ev = lambda m, name: cached(out / f"{name}.json", lambda: evaluate_task(  # noqa: E731
        str(m), None, a.task, num=a.eval_num, difficulty=difficulty, seed=2, max_tokens=a.max_new_tokens))
    before = ev(model, "eval_before")
    log(f"before GRPO: held-out pass@1 {before['pass@1']:.3f} at difficulty {difficulty}")
    if not (run / "model" / "config.json").exists():
        cfg = GRPOConfig(task=a.task, difficulty=difficulty, group_size=a.group_size,
                         prompts_per_step=a.prompts_per_step, max_new_tokens=a.max_new_tokens, loss_type=a.loss_type,
                         beta=a.beta, dynamic_sampling=True, eval_num=a.grpo_eval_num)
        train = TrainConfig(**{**GRPO_DEFAULTS, "minutes": a.grpo_minutes, "lr": a.lr,
                               "eval_every": a.grpo_eval_every, "checkpoint_every": 20})
        log(f"GRPO for {a.grpo_minutes} min: {cfg.prompts_per_step} prompts x {cfg.group_size}, lr {a.lr}")
        grpo(model, run, cfg, train, resume=(run / "checkpoints").exists())
    after = ev(run / "model", "eval_after")
    log(f"after GRPO: held-out pass@1 {after['pass@1']:.3f} (was {before['pass@1']:.3f})")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    metrics = [m for m in metrics if m.get("stage") == "grpo"]
    receipt = json.loads((run / "receipt.json").read_text())
    return {"before": slim(before), "after": slim(after), "metrics": metrics, "receipt": receipt}


def phase_tts(a, model: Path, out: Path, difficulty: str) -> list[dict]:
    rows = []
    for b in [int(x) for x in a.budgets.split(",")] + [None]:
        s = cached(out / f"tts_{b}.json", lambda: evaluate_task(  # noqa: B023
            str(model), None, a.task, num=a.eval_num, difficulty=difficulty, seed=2, thinking_budget=b,
            max_tokens=a.max_new_tokens + 16))
        rows.append({"budget": b, "pass@1": s["pass@1"], "mean_length": s["mean_length"]})
        log(f"thinking budget {b}: pass@1 {s['pass@1']:.3f}, {s['mean_length']:.0f} tokens")
    return rows


def phase_distill(a, teacher: Path, out: Path, difficulty: str, tokenizer_dir: Path) -> dict:
    base = out / "student_base"
    if not (base / "model" / "config.json").exists():
        log(f"pretraining the student ({a.student_preset}) for {a.student_minutes} min with the teacher's tokenizer")
        cfg = TrainConfig(minutes=a.student_minutes, batch_size=16, seq_len=256, eval_every=100,
                          checkpoint_every=500, warmup_steps=20, schedule="wsd")
        pretrain(preset(a.student_preset), cfg, DataConfig(paths=[a.data], tokenizer=str(tokenizer_dir)), base)
    ev = lambda m, name: cached(out / f"{name}.json", lambda: evaluate_task(  # noqa: E731
        str(m), None, a.task, num=a.eval_num, difficulty=difficulty, seed=2, max_tokens=a.max_new_tokens))
    student_before = ev(base / "model", "eval_student_before")
    run = out / "distill"
    train = TrainConfig(**{**SFT_DEFAULTS, "lr": a.distill_lr, "seq_len": 512, "batch_size": 8})
    if not (run / "student" / "model" / "config.json").exists():
        distill(teacher, run, a.task, base / "model", train, samples=a.distill_samples,
                num_prompts=a.distill_prompts, difficulty=difficulty, max_tokens=a.max_new_tokens,
                epochs=a.distill_epochs)
    student_after = ev(run / "student" / "model", "eval_student_after")
    log(f"student: pass@1 {student_before['pass@1']:.3f} -> {student_after['pass@1']:.3f} after distillation")
    traces = json.loads((run / "traces.json").read_text())

    # The control: the same student given the same extra training (steps, lr) without the teacher, on more of
    # its own pretraining data (worked solutions at the corpus's difficulties), as many conversations as traces.
    control = out / "distill_control"
    if not (control / "model" / "config.json").exists():
        steps = json.loads((run / "student" / "receipt.json").read_text())["extra"]["steps"]
        task = get_task(a.task)
        levels = list(task.CORPUS_DIFFICULTIES)
        rows = []
        for i in range(traces["traces"]):
            problem = task.sample("train", 7_000_000 + i, levels[i % len(levels)])
            rows.append(conversation(task, problem))
        data = out / "distill_control.jsonl"
        atomic_write_text(data, "".join(json.dumps(r) + "\n" for r in rows))
        sft(base / "model", data, control, dataclasses.replace(train, steps=steps))
    student_control = ev(control / "model", "eval_student_control")
    log(f"student with the same training on its own corpus instead: pass@1 {student_control['pass@1']:.3f}")
    return {"before": slim(student_before), "after": slim(student_after), "control": slim(student_control),
            "traces": traces}


# ============================================================================ plots and the results section
def plot_curves(metrics: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    steps = [m["step"] for m in metrics if "reward" in m]
    pick = lambda k: [m[k] for m in metrics if "reward" in m]  # noqa: E731
    axes[0].plot(steps, pick("reward"), marker=".", label="reward")
    axes[0].set(title="reward (train rollouts)", xlabel="step")
    axes[1].plot(steps, pick("accuracy"), marker=".", label="train accuracy (sampled)", alpha=0.7)
    ev = [(m["step"], m["eval_accuracy"]) for m in metrics if "eval_accuracy" in m]
    if ev:
        axes[1].plot(*zip(*ev), marker="o", label="held-out pass@1 (greedy)")
    axes[1].set(title="accuracy", xlabel="step", ylim=(-0.02, 1.02))
    axes[1].legend(fontsize=8)
    axes[2].plot(steps, pick("response_length"), marker=".")
    axes[2].set(title="response length (tokens)", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tts(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    xs = [r["mean_length"] for r in rows]
    ax.plot(xs, [r["pass@1"] for r in rows], marker="o")
    for r, x in zip(rows, xs):
        ax.annotate("none" if r["budget"] is None else str(r["budget"]), (x, r["pass@1"]), fontsize=7)
    ax.set(title="test-time scaling: thinking budget", xlabel="mean tokens per answer", ylabel="held-out pass@1")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section(a, res: dict, cmd: str) -> str:
    lines = [SECTION, "",
             f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
             f"torch {torch.__version__}. Command: `{cmd}` ({res['total_minutes']:.0f} min end to end).", ""]
    if "grpo" in res:
        g, d = res["grpo"], res["difficulty"]
        m = g["metrics"]
        steps = max((x["step"] for x in m), default=0)
        roll = sum(x.get("rollout_seconds", 0) for x in m)
        upd = sum(x.get("update_seconds", 0) for x in m)
        delta = g["after"]["pass@1"] - g["before"]["pass@1"]
        lines += [f"**GRPO** on `{a.task}` difficulty {d} (edge probe, greedy pass@1 by difficulty: "
                  f"{', '.join(f'{k}: {v:.2f}' for k, v in res['probe'].items())}); {a.preset} pretrained "
                  f"{a.pretrain_minutes:g} min on the built-in corpus; {a.prompts_per_step} prompts x {a.group_size} "
                  f"samples per step, loss {a.loss_type}, beta {a.beta}, lr {a.lr}, dynamic sampling, "
                  f"{a.max_new_tokens} new tokens max.", "",
                  "| held-out (greedy, n=%d) | before | after GRPO | change |" % a.eval_num, "|---|---|---|---|",
                  f"| pass@1 | {g['before']['pass@1']:.3f} | {g['after']['pass@1']:.3f} | "
                  f"{100 * delta:+.1f} points |",
                  f"| format rate | {g['before']['format_rate']:.2f} | {g['after']['format_rate']:.2f} | |",
                  f"| mean length (tokens) | {g['before']['mean_length']:.0f} | {g['after']['mean_length']:.0f} | |",
                  "", f"{steps} GRPO steps in {g['receipt']['wall_seconds'] / 60:.1f} min: rollouts {roll:.0f} s, "
                  f"updates {upd:.0f} s ({100 * roll / max(roll + upd, 1e-9):.0f}% of step time generating). "
                  f"Target: >= +15 points within 20 minutes: **{'met' if delta >= 0.15 else 'not met'}**.", "",
                  "![GRPO curves](r1_zero_curves.png)", ""]
    if "tts" in res:
        lines += ["**Test-time scaling** (the GRPO model, greedy, `--thinking-budget N` forces `</think>` after N "
                  "thinking tokens):", "", "| thinking budget | " + " | ".join(
                      "none" if r["budget"] is None else str(r["budget"]) for r in res["tts"]) + " |",
                  "|---|" + "---|" * len(res["tts"]),
                  "| pass@1 | " + " | ".join(f"{r['pass@1']:.3f}" for r in res["tts"]) + " |",
                  "| mean tokens | " + " | ".join(f"{r['mean_length']:.0f}" for r in res["tts"]) + " |", "",
                  "![test-time scaling](r1_zero_tts.png)", ""]
    if "distill" in res:
        dd = res["distill"]
        t = dd["traces"]
        lines += [f"**Distillation**: the GRPO model answered {t['prompts']} train prompts x {t['samples']} "
                  f"(temperature 0.7); {t['correct']}/{t['generated']} verified correct, {t['traces']} traces kept. "
                  f"Student `{a.student_preset}` pretrained {a.student_minutes:g} min, then SFT on the traces "
                  f"(lr {a.distill_lr:g}, {a.distill_epochs:g} epochs); the control gets the same SFT steps on "
                  f"worked solutions from its own pretraining distribution instead.", "",
                  "| student, held-out pass@1 | as pretrained | + SFT on its own corpus (control) | "
                  "+ SFT on the teacher's traces |", "|---|---|---|---|",
                  f"| `{a.student_preset}` | {dd['before']['pass@1']:.3f} | {dd['control']['pass@1']:.3f} | "
                  f"{dd['after']['pass@1']:.3f} |", ""]
    if "distill_skipped" in res:
        lines += [f"**Distillation** skipped: {res['distill_skipped']}.", ""]
    lines += ["Reproduce each step alone:", "", "```",
              f"OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node {a.pretrain_workers} -m nanoseek pretrain "
              f"--preset {a.preset} --data {a.data} --minutes {a.pretrain_minutes:g} "
              f"--batch-size {16 // a.pretrain_workers} --seq-len 256 --run-dir {a.out}/pretrain",
              f"nanoseek eval {a.out}/pretrain --task {a.task} --difficulty {res.get('difficulty', 'D')} "
              f"--num {a.eval_num} --seed 2 --max-tokens {a.max_new_tokens}",
              f"nanoseek grpo --init {a.out}/pretrain --run {a.out}/grpo --task {a.task} "
              f"--difficulty {res.get('difficulty', 'D')} --minutes {a.grpo_minutes:g} --group-size {a.group_size} "
              f"--prompts-per-step {a.prompts_per_step} --max-new-tokens {a.max_new_tokens} --lr {a.lr} "
              f"--loss-type {a.loss_type} --beta {a.beta} --dynamic-sampling --eval-num {a.grpo_eval_num} "
              f"--set eval_every={a.grpo_eval_every}",
              f"nanoseek eval {a.out}/grpo --task {a.task} --difficulty {res.get('difficulty', 'D')} "
              f"--num {a.eval_num} --seed 2 --thinking-budget 32",
              f"nanoseek distill --teacher {a.out}/grpo --run {a.out}/distill --task {a.task} "
              f"--difficulty {res.get('difficulty', 'D')} --student-preset {a.student_preset} "
              f"--samples {a.distill_samples} --num-prompts {a.distill_prompts} --lr {a.distill_lr:g} "
              f"--epochs {a.distill_epochs:g}",
              "```", ""]
    return "\n".join(lines)


def main() -> int:
    a = parse()
    if a.threads:
        torch.set_num_threads(a.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    phases = set(a.phases.split(","))
    t0 = time.perf_counter()
    res: dict = {}
    model = phase_pretrain(a, out)
    difficulty, res["probe"] = edge_difficulty(a, model, out)
    res["difficulty"] = difficulty
    log(f"GRPO difficulty: {difficulty}")
    teacher = out / "grpo" / "model"
    if "grpo" in phases:
        res["grpo"] = phase_grpo(a, model, out, difficulty)
        plot_curves(res["grpo"]["metrics"], out / "r1_zero_curves.png")
    if "tts" in phases and teacher.exists():
        res["tts"] = phase_tts(a, teacher, out, difficulty)
        plot_tts(res["tts"], out / "r1_zero_tts.png")
    if "distill" in phases and teacher.exists():
        try:
            res["distill"] = phase_distill(a, teacher, out, difficulty, model)
        except ValueError as e:  # e.g. the teacher solved nothing (always so for --smoke): say so, keep the rest
            log(f"distillation skipped: {e}")
            res["distill_skipped"] = str(e)
    res["total_minutes"] = (time.perf_counter() - t0) / 60
    atomic_write_json(out / "results.json", {k: v for k, v in res.items() if k != "grpo"} |
                      {"grpo": {k: v for k, v in res.get("grpo", {}).items() if k != "metrics"}})
    text = section(a, res, "python benchmarks/r1_zero_cpu.py " + " ".join(sys.argv[1:]))
    print(text)
    if not a.no_write:
        for name in ("r1_zero_curves.png", "r1_zero_tts.png"):
            if (out / name).exists():
                (HERE / name).write_bytes((out / name).read_bytes())
        write_section(SECTION, text)
        log(f"wrote {SECTION!r} in {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
