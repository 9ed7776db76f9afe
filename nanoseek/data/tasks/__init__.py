"""Verifiable tasks as plugins (ARCHITECTURE.md decision 8), and the built-in corpus they generate.

    from nanoseek.data.tasks import get_task, builtin_corpus
    task = get_task("countdown")
    p = task.sample("eval", index=0, difficulty=4)     # held out: never produced by a "train" draw
    task.prompt(p); task.solution(p, rng); task.verify(p, completion).total

Pretraining text, SFT traces, RL prompts and evaluation sets all come from the same task modules; everything
meant for training draws from the "train" split, so held-out problems stay held out. To add a task, write a
module with the functions listed in base.py and add it to TASKS.
"""

from __future__ import annotations

import random
from typing import Iterator, Mapping, Sequence

from nanoseek.data.tasks import arithmetic, countdown
from nanoseek.data.tasks.base import (ANSWER, END_ANSWER, END_THINK, EVAL_BUCKETS, THINK, Problem, Reward,
                                      RewardConfig, Task, extract_answer, is_well_formed, split_of)

TASKS: dict[str, Task] = {m.NAME: m for m in (arithmetic, countdown)}  # type: ignore[misc]

# Chat markers, as strings (the tokenizer turns each into one token); see nanoseek.tokenizer for the format.
USER, ASSISTANT = "<|user|>", "<|assistant|>"

__all__ = ["TASKS", "Task", "Problem", "Reward", "RewardConfig", "get_task", "builtin_corpus", "document",
           "bare_answer", "BARE_ANSWER_FRAC", "extract_answer", "is_well_formed", "split_of", "EVAL_BUCKETS"]


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}: choose one of {', '.join(sorted(TASKS))}") from None


# The share of built-in documents that state the bare answer after an empty think block instead of working the
# problem through. Text in the wild has both, and a model that has seen both can either answer at once or think:
# that choice is what R1-Zero's RL visibly learns (responses grow longer as accuracy rises), and a single early
# token on which samples of one prompt disagree gives GRPO a strong signal. Trained on worked solutions alone,
# `tiny`'s samples almost never disagreed and GRPO did not move it (benchmarks/RESULTS.md, issue 5).
BARE_ANSWER_FRAC = 0.5


def bare_answer(task: Task, problem: Problem, rng: random.Random | None = None) -> str:
    """The right answer with no work shown: "<think>\n</think><answer>X</answer>"."""
    return f"{THINK}\n{END_THINK}{ANSWER}{extract_answer(task.solution(problem, rng))}{END_ANSWER}"


def document(task: Task, problem: Problem, rng: random.Random | None = None, bare: bool = False) -> str:
    """One training document: the prompt and its worked solution (or, with `bare`, only its answer) as a chat
    turn. Framed as BOS + document + EOS (what the shard builder does to every document) it is exactly the chat
    template's rendering, so a model pretrained on it already speaks the format that SFT, RL and `chat` use."""
    reply = bare_answer(task, problem, rng) if bare else task.solution(problem, rng)
    return f"{USER}{task.prompt(problem)}{ASSISTANT}{reply}"


def builtin_corpus(num_docs: int, seed: int = 0, *, tasks: Sequence[str] | None = None,
                   difficulties: Mapping[str, Sequence[int]] | None = None,
                   bare_frac: float = BARE_ANSWER_FRAC) -> Iterator[str]:
    """Yield `num_docs` training documents mixing tasks and difficulties, deterministic in `seed`.

    By default each task contributes its CORPUS_DIFFICULTIES, the short problems. A CPU-scale run sees only a
    few million tokens: short problems give it many more worked examples of the basic moves (copying operands,
    one column at a time) per token than long ones, and leave the harder levels for RL and evaluation.

    Each document is a "train"-split problem rendered by `document`: "<|user|>PROMPT<|assistant|><think>
    ...</think><answer>X</answer>" (no BOS/EOS: the consumer frames documents); a `bare_frac` share of them
    give only the answer (see BARE_ANSWER_FRAC). `difficulties` overrides a task's levels, e.g.
    {"arithmetic": [1, 2, 3]}."""
    names = list(tasks) if tasks else sorted(TASKS)
    chosen = [get_task(n) for n in names]
    rng = random.Random(seed)
    for _ in range(num_docs):
        task = rng.choice(chosen)
        levels = list((difficulties or {}).get(task.NAME, task.CORPUS_DIFFICULTIES))
        problem = task.sample("train", rng.getrandbits(63), rng.choice(levels))
        yield document(task, problem, rng, bare=rng.random() < bare_frac)
