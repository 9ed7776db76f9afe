"""Held-out evaluation: pass@1, pass@k and maj@k on a task's eval split or on any JSONL of prompts and answers.

    from nanoseek.evaluate import evaluate_task
    summary = evaluate_task("runs/tiny", None, "arithmetic", num=100, difficulty=4, samples=8, temperature=0.6)
    summary["pass@1"], summary["pass@8"], summary["maj@8"]

Why these three numbers (R1 reports all of them):
- pass@1 is the mean accuracy over all samples: the expected accuracy of one answer.
- pass@k is the chance that at least one of k answers is right, estimated without bias from n >= k samples
  (Chen et al. 2021): 1 - C(n-c, k) / C(n, k) with c right out of n. Taking "any of the first k" instead would
  have high variance and waste the other samples.
- maj@k (R1's cons@k) votes over the extracted answers of k samples and scores the winner: what a user gets
  by asking k times and trusting the consensus. RL tends to raise pass@1 and maj@k and narrow pass@k.

Problems come from split "eval", which no training draw can produce (nanoseek.data.tasks.base). The model runs
through the engine (continuous batching), so evaluation of n problems x k samples is one `generate` call.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from nanoseek.data.sources import read_jsonl_rows
from nanoseek.data.tasks import Problem, Task, extract_answer, get_task, is_well_formed
from nanoseek.infer.engine import Engine

DEFAULT_MAX_TOKENS = 512


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, the numerically stable product)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every choice of k samples contains a correct one
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most common extracted answer (whitespace-stripped); ties go to the one seen first; None if none."""
    votes = Counter(a.strip() for a in answers if a is not None and a.strip())
    if not votes:
        return None
    best = max(votes.values())
    return next(a.strip() for a in answers if a is not None and a.strip() and votes[a.strip()] == best)


def ks_for(samples: int) -> list[int]:
    """The k values reported for n samples: powers of two up to n, and n itself."""
    ks = [k for k in (2 ** i for i in range(12)) if k <= samples]
    return sorted(set(ks + [samples]))


def parse_difficulties(text: str | int | Sequence[int] | None) -> list[int] | None:
    """`4`, `"3,4"` or [3, 4] -> [3, 4]; None stays None (the task's default)."""
    if text is None:
        return None
    if isinstance(text, int):
        return [text]
    if isinstance(text, str):
        try:
            return [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"difficulty {text!r} is not an integer or a comma-separated list like 3,4") from None
    return [int(x) for x in text]


def task_problems(task: Task, num: int, difficulty=None, seed: int = 0, split: str = "eval") -> list[Problem]:
    """`num` problems of one split, cycling through the difficulties; a different `seed` gives a different set."""
    levels = parse_difficulties(difficulty) or [task.DEFAULT_DIFFICULTY]
    return [task.sample(split, seed * 1_000_003 + i, levels[i % len(levels)]) for i in range(num)]


def _engine(model_or_engine, tokenizer, max_tokens: int, max_batch: int) -> Engine:
    if isinstance(model_or_engine, Engine):
        return model_or_engine
    engine = Engine(model_or_engine, tokenizer=tokenizer, max_batch=max_batch)
    if engine.tokenizer is None:
        raise ValueError("evaluation needs a tokenizer: the model directory has no tokenizer.json")
    return engine


def _sampling(samples: int, temperature: float | None, top_p: float | None) -> tuple[float, float]:
    """(temperature, top_p): greedy for one sample; R1's evaluation sampling (0.6, top-p 0.95) when several are
    drawn."""
    if temperature is None:
        temperature = 0.0 if samples == 1 else 0.6
    if samples > 1 and temperature == 0:
        raise ValueError("--samples > 1 with --temperature 0 draws the same answer k times; give a temperature > 0")
    if top_p is None:
        top_p = 1.0 if temperature == 0 else 0.95
    if not 0 < top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {top_p}")
    return temperature, top_p


def _score_rows(rows: list[dict], outputs: list, samples: int, judge) -> dict[str, Any]:
    """Aggregate per-problem results. `judge(row, text) -> (correct, answer)`; `judge(row, None, answer)` scores
    a bare (voted) answer."""
    ks = ks_for(samples)
    pass_k = {k: 0.0 for k in ks}
    maj_k = {k: 0.0 for k in ks}
    per_level: dict[str, list[float]] = {}
    correct_total = fmt_total = len_total = trunc_total = 0
    details = []
    for i, row in enumerate(rows):
        outs = outputs[i * samples:(i + 1) * samples]
        verdicts = [judge(row, o.text) for o in outs]
        c = sum(v[0] for v in verdicts)
        correct_total += c
        fmt_total += sum(is_well_formed(o.text) for o in outs)
        len_total += sum(len(o.token_ids) for o in outs)
        trunc_total += sum(o.finish_reason == "length" for o in outs)
        for k in ks:
            pass_k[k] += pass_at_k(samples, c, k)
            voted = majority_vote([v[1] for v in verdicts[:k]])
            maj_k[k] += float(voted is not None and judge(row, None, voted)[0])
        if "difficulty" in row:
            per_level.setdefault(str(row["difficulty"]), []).append(c / samples)
        details.append({"prompt": row["prompt"], "correct": c, "samples": samples,
                        "answers": [v[1] for v in verdicts], "first_completion": outs[0].text})
    n, total = len(rows), len(rows) * samples
    summary: dict[str, Any] = {"num": n, "samples": samples, "pass@1": correct_total / total}
    for k in ks:
        summary[f"pass@{k}"] = pass_k[k] / n
        summary[f"maj@{k}"] = maj_k[k] / n
    summary.update(format_rate=fmt_total / total, mean_length=len_total / total, truncated=trunc_total / total)
    if len(per_level) > 1:
        summary["pass@1_by_difficulty"] = {k: sum(v) / len(v) for k, v in sorted(per_level.items())}
    summary["problems"] = details
    return summary


def evaluate_rows(model_or_engine, tokenizer, rows: list[dict], task: Task | str | None = None, samples: int = 1,
                  temperature: float | None = None, top_p: float | None = None, thinking_budget: int | None = None,
                  seed: int = 0, max_tokens: int = DEFAULT_MAX_TOKENS, max_batch: int = 32, progress: bool = False
                  ) -> dict[str, Any]:
    """Evaluate rows {"prompt", "answer"[, "problem"]}. A row carrying a task problem is judged by the task's
    verifier; otherwise the extracted <answer> must equal `answer` exactly (after stripping whitespace)."""
    if not rows:
        raise ValueError("nothing to evaluate: no rows")
    if samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples}")
    task = get_task(task) if isinstance(task, str) else task
    temp, top_p = _sampling(samples, temperature, top_p)
    engine = _engine(model_or_engine, tokenizer, max_tokens, max_batch)

    def judge(row: dict, text: str | None, answer: str | None = None) -> tuple[bool, str | None]:
        if text is None:  # a voted answer: judge it as the only thing the model wrote
            text = f"<answer>{answer}</answer>"
        if task is not None and row.get("problem") is not None:
            r = task.verify(Problem.from_dict(row["problem"]), text)
            return r.accuracy > 0, r.answer
        got = extract_answer(text)
        return got is not None and got.strip() == str(row.get("answer", "")).strip(), got

    prompts = []
    for row in rows:
        messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
        prompts += [messages] * samples
    t0 = time.perf_counter()
    outputs = engine.generate(prompts, max_tokens=max_tokens, chat=True, temperature=temp, top_p=top_p,
                              seed=seed, thinking_budget=thinking_budget, progress=progress)
    summary = {"task": getattr(task, "NAME", None), "temperature": temp, "top_p": top_p,
               "thinking_budget": thinking_budget, "max_tokens": max_tokens, "seed": seed,
               **_score_rows(rows, outputs, samples, judge)}
    summary["seconds"] = time.perf_counter() - t0
    return summary


def evaluate_task(model_or_engine, tokenizer, task: Task | str, num: int = 100, difficulty=None, samples: int = 1,
                  temperature: float | None = None, top_p: float | None = None, thinking_budget: int | None = None,
                  seed: int = 0, max_tokens: int = DEFAULT_MAX_TOKENS, max_batch: int = 32, progress: bool = False
                  ) -> dict[str, Any]:
    """pass@1 / pass@k / maj@k on `num` held-out problems of `task` (difficulty: an int, "3,4" or a list).

    `model_or_engine` is a model, a model or run directory, or an `Engine` (reused as is: GRPO passes its own).
    `tokenizer` may be None when the model directory holds one. Returns the JSON-able summary."""
    task = get_task(task) if isinstance(task, str) else task
    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}")
    problems = task_problems(task, num, difficulty, seed)
    rows = [{"prompt": task.prompt(p), "problem": p.to_dict(), "difficulty": p.difficulty} for p in problems]
    summary = evaluate_rows(model_or_engine, tokenizer, rows, task, samples, temperature, top_p, thinking_budget,
                            seed, max_tokens, max_batch, progress)
    summary["difficulty"] = parse_difficulties(difficulty) or [task.DEFAULT_DIFFICULTY]
    return summary


def read_eval_jsonl(path: str | Path) -> list[dict]:
    """Rows of {"prompt" (or "messages"), "answer"}; one clear error naming the line otherwise."""
    rows = []
    for n, row in read_jsonl_rows(path, "evaluation file"):
        if "answer" not in row or not ("prompt" in row or "messages" in row):
            raise ValueError(f"{path} line {n} needs a \"prompt\" (or \"messages\") and an \"answer\" field")
        if "prompt" not in row:
            row["prompt"] = row["messages"][-1]["content"]
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return rows


def short(summary: dict[str, Any]) -> str:
    """One line for logs: pass@1, the largest pass@k and maj@k."""
    k = summary["samples"]
    parts = [f"pass@1 {summary['pass@1']:.3f}"]
    if k > 1:
        parts += [f"pass@{k} {summary[f'pass@{k}']:.3f}", f"maj@{k} {summary[f'maj@{k}']:.3f}"]
    parts.append(f"format {summary['format_rate']:.2f}, {summary['mean_length']:.0f} tokens, "
                 f"{summary['truncated']:.0%} truncated")
    return "; ".join(parts)
