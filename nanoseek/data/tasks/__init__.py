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
           "conversation", "extract_answer", "is_well_formed", "split_of", "EVAL_BUCKETS"]


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}: choose one of {', '.join(sorted(TASKS))}") from None


def document(task: Task, problem: Problem, rng: random.Random | None = None) -> str:
    """One training document: the prompt and its worked solution as a chat turn. Framed as BOS + document + EOS
    (what the shard builder does to every document) it is exactly the chat template's rendering, so a model
    pretrained on it already speaks the format that SFT, RL and `chat` use."""
    return f"{USER}{task.prompt(problem)}{ASSISTANT}{task.solution(problem, rng)}"


def conversation(task: Task, problem: Problem, answer: str | None = None) -> dict:
    """One SFT row in the OpenAI `messages` format: the prompt, and `answer` (default: the worked solution)."""
    answer = task.solution(problem) if answer is None else answer
    return {"messages": [{"role": "user", "content": task.prompt(problem)}, {"role": "assistant", "content": answer}]}


def builtin_corpus(num_docs: int, seed: int = 0, *, tasks: Sequence[str] | None = None,
                   difficulties: Mapping[str, Sequence[int]] | None = None) -> Iterator[str]:
    """Yield `num_docs` training documents mixing tasks and difficulties, deterministic in `seed`.

    By default each task contributes its CORPUS_DIFFICULTIES, the short problems. A CPU-scale run sees only a
    few million tokens: short problems give it many more worked examples of the basic moves (copying operands,
    one column at a time) per token than long ones, and leave the harder levels for RL and evaluation.

    Each document is a "train"-split problem rendered by `document`: "<|user|>PROMPT<|assistant|><think>
    ...</think><answer>X</answer>" (no BOS/EOS: the consumer frames documents). `difficulties` overrides a
    task's levels, e.g. {"arithmetic": [1, 2, 3]}. Why worked solutions only: a corpus where half the documents
    state the bare answer (so that RL could learn to think instead of guessing) taught `tiny` far worse traces
    in the same time, 3% right at 3 digits instead of 31% (benchmarks/RESULTS.md, issue 5)."""
    names = list(tasks) if tasks else sorted(TASKS)
    chosen = [get_task(n) for n in names]
    rng = random.Random(seed)
    for _ in range(num_docs):
        task = rng.choice(chosen)
        levels = list((difficulties or {}).get(task.NAME, task.CORPUS_DIFFICULTIES))
        problem = task.sample("train", rng.getrandbits(63), rng.choice(levels))
        yield document(task, problem, rng)
