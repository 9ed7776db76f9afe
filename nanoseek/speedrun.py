"""`nanoseek speedrun`: the whole recipe in one command, sized by a budget, with a receipt.

    tokenizer -> pretrain (MLA + MoE + MTP, built-in corpus) -> eval -> SFT -> eval -> GRPO -> eval -> report

Each stage is a run directory under the speedrun's root (`pretrain/`, `sft/`, `grpo/`) with its own receipt and
`eval.json`. Re-running the same command resumes: finished stages are skipped, an interrupted one continues from
its last checkpoint. Time is planned against a deadline, not per stage: after each stage the time left is
shared out again, so a slow stage is paid for by the later ones and the whole run lands on its budget.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanoseek import cost
from nanoseek.atomic import atomic_write_json, atomic_write_text
from nanoseek.data.tasks import conversation, get_task

# Shares of the training time left (evaluation and data preparation are paid for out of the same clock).
STAGE_SHARES = {"pretrain": 0.55, "sft": 0.10, "grpo": 0.35}
# Countdown (TinyZero's task) by default: at its edge a CPU-trained `tiny` finds answers by sampling that greedy
# decoding misses (2 numbers: 48% greedy, 84% pass@8), which is what GRPO turns into pass@1. At arithmetic's edge
# the samples of a group differ by a digit or two and GRPO barely moved greedy accuracy (benchmarks/RESULTS.md).
DEFAULT_TASK = "countdown"
MASTERED = 0.9  # greedy pass@1 at which a difficulty counts as learnt
# Engine rows for the held-out evaluations: 500 greedy countdown problems took 22 s at 64 rows and 12 s at 256
# on `tiny` (CPU); the latent cache then holds 256 x 1024 tokens (0.9 GB for `tiny` in float32).
EVAL_ROWS = 256


@dataclass
class Plan:
    preset: str
    minutes: float
    task: str = DEFAULT_TASK
    difficulty: int | None = None  # None: probed after pretraining (the edge of competence)
    # 500 held-out problems put the standard error of a pass@1 near 15% at 1.6 points; on 100 it was 3.6, as large
    # as the differences between stages (benchmarks/RESULTS.md, issue 5: 0.20 on 100 problems was 0.156 on 500).
    eval_num: int = 500
    probe_num: int = 48
    probe_difficulties: tuple[int, ...] = ()  # empty: the task's first five levels
    max_new_tokens: int = 320
    device: str = "cpu"
    price_per_hour: float | None = None
    smoke: bool = False  # fixed tiny step counts instead of minutes: the pipeline check CI runs
    workers: int = 1  # pretraining processes (data parallel); on a CPU, one single-threaded process per core

    def __post_init__(self):
        if not self.probe_difficulties:  # countdown starts at 2 numbers, arithmetic at 1 digit
            self.probe_difficulties = tuple(get_task(self.task).DIFFICULTIES)[:5]

    @property
    def stage_steps(self) -> dict[str, int] | None:
        return {"pretrain": 30, "sft": 6, "grpo": 2} if self.smoke else None


def make_plan(minutes: float | None = None, budget_usd: float | None = None, device: str | None = None,
              preset: str | None = None, task: str | None = None, price_per_hour: float | None = None,
              workers: int | None = None) -> Plan:
    """Turn a time or money budget into a plan: which model, how many minutes, how many pretraining processes."""
    device_key = device or cost.detect_device()
    dev = cost.get_device(device_key)
    price = dev.price_per_hour if price_per_hour is None else price_per_hour
    if budget_usd is not None:
        if budget_usd <= 0:
            raise ValueError(f"--budget-usd must be positive, got {budget_usd}")
        if price <= 0:
            raise ValueError(f"{dev.name} has no price per hour, so a dollar budget cannot become time; "
                             f"pass --minutes instead, or --price")
        minutes = 60.0 * budget_usd / price
    minutes = 30.0 if minutes is None else minutes
    if minutes <= 0:
        raise ValueError(f"--minutes must be positive, got {minutes}")
    if preset is None:
        # The CPU gets the tiny model; a GPU gets a model it can fill in the time (about 20 tokens per parameter).
        preset = "tiny" if device_key == "cpu" else "d12" if minutes <= 120 else "d16"
    smoke = preset == "smoke"
    if workers is None:
        from nanoseek.train.pretrain import cpu_workers

        workers = cpu_workers() if device_key == "cpu" and not smoke else 1
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    plan = Plan(preset=preset, minutes=minutes, task=task or DEFAULT_TASK, device=device_key,
                price_per_hour=price, smoke=smoke, workers=workers)
    if smoke:
        plan = dataclasses.replace(plan, eval_num=8, probe_num=4, probe_difficulties=plan.probe_difficulties[:2],
                                   max_new_tokens=48)
    return plan


class Clock:
    """The speedrun's deadline, carried across resumes in `plan.json` as minutes already spent."""

    def __init__(self, budget_minutes: float, spent_minutes: float = 0.0):
        self.budget, self.spent_before, self.start = budget_minutes, spent_minutes, time.monotonic()

    def spent(self) -> float:
        return self.spent_before + (time.monotonic() - self.start) / 60.0

    def left(self) -> float:
        return max(0.0, self.budget - self.spent())

    def share(self, stage: str, remaining_stages: list[str], reserve: float) -> float:
        """Minutes of training for `stage`: its share of what is left after `reserve` (evals, report)."""
        total = sum(STAGE_SHARES[s] for s in remaining_stages)
        return max(0.25, (self.left() - reserve) * STAGE_SHARES[stage] / total)


# ============================================================================ stages
def _done(stage_dir: Path) -> bool:
    return (stage_dir / "receipt.json").exists() and (stage_dir / "eval.json").exists()


def _eval(stage_dir: Path, plan: Plan, difficulty, say) -> dict[str, Any]:
    from nanoseek.evaluate import evaluate_task
    from nanoseek.tokenizer import Tokenizer

    path = stage_dir / "eval.json"
    if path.exists():
        return json.loads(path.read_text())
    tokenizer = Tokenizer.load(stage_dir / "model")
    result = evaluate_task(stage_dir / "model", tokenizer, plan.task, num=plan.eval_num, difficulty=difficulty,
                           max_tokens=plan.max_new_tokens, max_batch=EVAL_ROWS, progress=True)
    result["stage"] = stage_dir.name
    atomic_write_json(path, result)
    say(f"{stage_dir.name}: held-out {plan.task} (difficulty {difficulty}) pass@1 = {result['pass@1']:.3f}")
    return result


def edge_of_competence(accuracy: dict[str, float], mastered: float = MASTERED) -> int:
    """The easiest difficulty the model has not mastered (greedy pass@1 below `mastered`); the hardest one if it
    has mastered them all. Training at a mastered level leaves RL nothing to learn (the speedrun4 run in
    benchmarks/RESULTS.md trained GRPO at a level already at 100%)."""
    levels = sorted(int(d) for d in accuracy)
    return next((d for d in levels if accuracy[str(d)] < mastered), levels[-1])


def _probe(model_dir: Path, plan: Plan, path: Path, say) -> int:
    """Greedy pass@1 of the pretrained model at each probe difficulty (cached in `path`) -> the edge."""
    from nanoseek.evaluate import evaluate_task
    from nanoseek.infer.engine import Engine

    if path.exists():
        probe = json.loads(path.read_text())
    else:
        engine = Engine(model_dir, max_batch=EVAL_ROWS)  # one model load for every difficulty
        probe = {str(d): evaluate_task(engine, None, plan.task, num=plan.probe_num, difficulty=d,
                                       max_tokens=plan.max_new_tokens)["pass@1"] for d in plan.probe_difficulties}
        atomic_write_json(path, probe)
    say("edge probe, greedy pass@1 by difficulty: " + ", ".join(f"{d}: {a:.2f}" for d, a in probe.items()))
    return edge_of_competence(probe)


def write_sft_data(path: Path, task_name: str, difficulty: int, num: int, seed: int = 0) -> Path:
    """Chat-format SFT data: train-split problems at the chosen difficulty and the one below, with their worked
    solutions. Not the one above: on countdown (edge 2 numbers) SFT on 2 and 3 numbers took greedy pass@1 from
    44.6% to 36.2%, on 2 numbers alone to 51.2% (benchmarks/RESULTS.md, issue 10)."""
    if path.exists():
        return path
    task = get_task(task_name)
    rng = random.Random(seed)
    levels = [d for d in (difficulty - 1, difficulty) if d in task.DIFFICULTIES] or [difficulty]
    rows = []
    for i in range(num):
        problem = task.sample("train", seed * 1_000_003 + i, rng.choice(levels))
        rows.append(conversation(task, problem))
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_speedrun(plan: Plan, root: str | Path, quiet: bool = False) -> dict[str, Any]:
    from nanoseek.config import preset as get_preset
    from nanoseek.train.grpo import TRAIN_DEFAULTS as GRPO_DEFAULTS
    from nanoseek.train.grpo import GRPOConfig, grpo
    from nanoseek.train.loop import TrainConfig
    from nanoseek.train.pretrain import DataConfig, pretrain, pretrain_processes
    from nanoseek.train.sft import TRAIN_DEFAULTS as SFT_DEFAULTS
    from nanoseek.train.sft import sft

    root = Path(root)
    for path in (root, root / "pretrain", root / "sft", root / "grpo"):  # before any stage starts (or a child)
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"{path} is a file, but the speedrun needs a directory there; "
                                     f"choose another --run or move the file")
    say = (lambda *a: None) if quiet else (lambda *a: print("[speedrun]", *a, flush=True))
    plan_path = root / "plan.json"
    saved = json.loads(plan_path.read_text()) if plan_path.exists() else None
    if saved and saved["plan"]["preset"] != plan.preset:
        raise ValueError(f"{root} holds a speedrun of preset {saved['plan']['preset']!r}; use that preset to "
                         f"resume it or choose another --run")
    clock = Clock(plan.minutes, saved["spent_minutes"] if saved else 0.0)
    if saved:
        plan = dataclasses.replace(plan, difficulty=saved["plan"].get("difficulty"))

    def checkpoint_plan() -> None:
        atomic_write_json(plan_path, {"plan": dataclasses.asdict(plan), "spent_minutes": clock.spent()})

    checkpoint_plan()
    say(f"plan: {plan.preset} on {plan.device}, {plan.minutes:.1f} minutes, task {plan.task}; writing to {root}")
    steps = plan.stage_steps
    # Each stage's share is computed from the time left when it starts, so the reserve only has to cover what
    # follows the last stage: its evaluation and the report (about a minute measured on `tiny`; the default
    # 30-minute run finished at 26.8 minutes with a 12% reserve).
    reserve = 0.0 if plan.smoke else max(0.75, 0.04 * plan.minutes)

    def limits(stage: str, remaining: list[str]) -> dict[str, Any]:
        if steps:
            return {"steps": steps[stage]}
        return {"minutes": clock.share(stage, remaining, reserve)}

    # 1. pretrain
    pre = root / "pretrain"
    if not _done(pre):
        train = {"batch_size": 8 if plan.smoke else 16, "seq_len": 128 if plan.smoke else 256,
                 "eval_every": 10 if plan.smoke else 50, "checkpoint_every": 100,
                 **limits("pretrain", ["pretrain", "sft", "grpo"])}
        # Only the task we will train and judge on: on a CPU budget every pretraining token should count for it
        # (each task is about half of the two-task corpus's text).
        data = f"builtin:{2000 if plan.smoke else 40000}:{plan.task}"
        resume = (pre / "config.json").exists()
        limit = f"{train['steps']} steps" if "steps" in train else f"{train['minutes']:.1f} min"
        on = f" on {plan.workers} single-threaded processes" if plan.workers > 1 else ""
        say(f"stage 1/3 pretrain: {limit}{on}")
        if plan.workers > 1:
            pretrain_processes(plan.preset, pre, train, data, plan.workers, plan.price_per_hour, resume, quiet)
        else:
            pretrain(get_preset(plan.preset), TrainConfig(**train), DataConfig(paths=[data]), pre, resume=resume,
                     price_per_hour=plan.price_per_hour, quiet=quiet)
        checkpoint_plan()
    if plan.difficulty is None:
        plan = dataclasses.replace(plan, difficulty=_probe(pre / "model", plan, root / "probe.json", say))
        checkpoint_plan()
    evals = {"pretrain": _eval(pre, plan, plan.difficulty, say)}

    # 2. SFT on worked solutions around the edge of competence
    sft_dir = root / "sft"
    if not _done(sft_dir):
        data = write_sft_data(root / "sft_data.jsonl", plan.task, plan.difficulty, 400 if plan.smoke else 4000)
        train = TrainConfig(**{**SFT_DEFAULTS, "batch_size": 8, "seq_len": 128 if plan.smoke else 512,
                               **limits("sft", ["sft", "grpo"])})
        say(f"stage 2/3 SFT: {train.steps or f'{train.minutes:.1f} min'}")
        sft(pre / "model", data, sft_dir, train, resume=(sft_dir / "config.json").exists(),
            price_per_hour=plan.price_per_hour, quiet=quiet)
        checkpoint_plan()
    evals["sft"] = _eval(sft_dir, plan, plan.difficulty, say)

    # 3. GRPO (R1-Zero style) at the edge of competence
    rl = root / "grpo"
    if not _done(rl):
        # Sequence-level loss (on `tiny` the DAPO token-level loss collapsed to one answer in all three 15-20
        # minute runs we made), no KL anchor, and two optimizer passes over each rollout batch: rollouts are most
        # of a step, so the second pass doubles the updates for far less than twice the time. Sampling at 0.7
        # keeps the groups' failures to the ones greedy decoding makes too (at 1.0 much of the signal goes on
        # unlikely tokens greedy never picks). lr 5e-5 after a 5-step warmup. This was the setting that moved
        # greedy accuracy most in 20-minute countdown runs (benchmarks/RESULTS.md, issue 5).
        cfg = GRPOConfig(task=plan.task, difficulty=str(plan.difficulty), group_size=4 if plan.smoke else 8,
                         prompts_per_step=2 if plan.smoke else 8, max_new_tokens=plan.max_new_tokens,
                         temperature=0.7, loss_type="grpo", beta=0.0, num_iterations=2,
                         dynamic_sampling=not plan.smoke,
                         eval_num=8 if plan.smoke else 32)
        train = TrainConfig(**{**GRPO_DEFAULTS, "lr": 5e-5, "warmup_steps": 5, **limits("grpo", ["grpo"])})
        say(f"stage 3/3 GRPO: {train.steps or f'{train.minutes:.1f} min'}")
        grpo(sft_dir / "model", rl, cfg, train, resume=(rl / "config.json").exists(),
             price_per_hour=plan.price_per_hour, quiet=quiet)
        checkpoint_plan()
    evals["grpo"] = _eval(rl, plan, plan.difficulty, say)
    checkpoint_plan()
    return finish(root, plan, evals, clock, say)


def finish(root: Path, plan: Plan, evals: dict[str, dict], clock: Clock, say) -> dict[str, Any]:
    """The report card and the speedrun's own receipt (all stages summed, and projected to one H100)."""
    from nanoseek.report import write_report

    stages = [root / s for s in ("pretrain", "sft", "grpo")]
    receipts = [cost.read_receipt(s / "receipt.json") for s in stages]
    rows = cost.summarize(receipts)
    total = rows[-1]
    summary = {
        "preset": plan.preset, "task": plan.task, "difficulty": plan.difficulty, "budget_minutes": plan.minutes,
        "wall_minutes": clock.spent(),
        "accuracy": {name: e["pass@1"] for name, e in evals.items()},
        "grpo_gain_points": 100 * (evals["grpo"]["pass@1"] - evals["sft"]["pass@1"]),
        "stages": rows,
        "device_hours": sum(r.device_hours for r in receipts),
        "dollars": sum(r.dollars for r in receipts),
        "price_per_hour": plan.price_per_hour,
    }
    atomic_write_json(root / "receipt.json", summary)
    report = write_report(stages, out_dir=root, eval_files=[s / "eval.json" for s in stages],
                          command=f"nanoseek speedrun --preset {plan.preset} --minutes {plan.minutes:g} --run {root}")
    say("")
    say(f"done in {summary['wall_minutes']:.1f} of {plan.minutes:g} minutes on {plan.device}")
    for name, e in evals.items():
        say(f"  held-out {plan.task} d{plan.difficulty} pass@1 after {name:8s} {100 * e['pass@1']:5.1f}%")
    say(f"  cost: {summary['device_hours']:.3f} device-hours = ${summary['dollars']:.4f} at "
        f"${plan.price_per_hour:.2f}/hour on {plan.device}; the same work on one H100 at 40% MFU: "
        f"{total['projected_hours']:.5f} hours = ${total['projected_dollars']:.4f}")
    say(f"  report card: {report}")
    say(f"  talk to it:  nanoseek chat {root / 'grpo'}")
    say(f"  serve it:    nanoseek serve {root / 'grpo'}   (OpenAI-compatible API and a chat page at http://127.0.0.1:8000)")
    return summary
