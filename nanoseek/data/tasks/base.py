"""What every verifiable task shares: the problem record, the reward, answer extraction and the train/eval split.

A task is a module (see arithmetic.py, countdown.py) exposing:

    NAME, DIFFICULTIES (the useful range), CORPUS_DIFFICULTIES (those in the built-in corpus), DEFAULT_DIFFICULTY
    generate(rng, difficulty) -> Problem          seeded, so the same rng state gives the same problem
    key(problem) -> str                           canonical form: problems that are "the same" share a key
    prompt(problem) -> str                        R1-Zero style: think in <think>, answer in <answer>
    solution(problem, rng) -> str                 a worked trace "<think>...</think><answer>X</answer>"
    verify(problem, completion, config=None) -> Reward
    sample(split, index, difficulty=None) -> Problem

Train and eval never overlap because the split is a property of the problem, not of the seed: a problem belongs
to eval exactly when the hash of its canonical key falls in bucket 0 (of EVAL_BUCKETS). Eval draws keep bucket 0,
train draws reject it, so no seed, index or difficulty can leak an eval problem into training.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol

# The same strings as nanoseek.tokenizer's special tokens; repeated here because the data layer imports only
# nanoseek.config (tests check the two agree).
THINK, END_THINK, ANSWER, END_ANSWER = "<think>", "</think>", "<answer>", "</answer>"
ASSISTANT = "<|assistant|>"

EVAL_BUCKETS = 10  # one problem in ten (by canonical hash) is held out for evaluation
SPLITS = ("train", "eval")

# One short line tells the model where to think and where to answer; kept short for ~512-token contexts.
INSTRUCTION = f"Think inside {THINK} {END_THINK}, then give only the final answer inside {ANSWER} {END_ANSWER}."


@dataclass(frozen=True)
class Problem:
    """A task instance. `data` holds the task's own fields (plain ints, strings, lists: JSON-serialisable)."""

    task: str
    difficulty: int
    data: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Problem":
        return cls(task=d["task"], difficulty=int(d["difficulty"]), data=dict(d["data"]))

    def __getitem__(self, name: str) -> Any:  # problem["target"] reads nicer than problem.data["target"]
        return self.data[name]


@dataclass(frozen=True)
class RewardConfig:
    """How a verdict becomes a number. Defaults are TinyZero's: 0 without an extractable answer, 0.1 for a
    parseable but wrong one, 1.0 for a right one. Set format_weight=1.0 for R1's equal-weight format reward."""

    correct: float = 1.0
    format_credit: float = 0.1  # for an answer we could extract but that is wrong
    format_weight: float = 0.0  # added when the whole completion is <think>...</think><answer>...</answer>


@dataclass(frozen=True)
class Reward:
    total: float
    accuracy: float  # 1.0 right, 0.0 otherwise
    format: float  # 1.0 if the completion is exactly one think block followed by exactly one answer block
    answer: str | None  # the extracted answer text, None if there was no single <answer>...</answer>
    reason: str  # one word or phrase for logs: "correct", "no answer", "wrong value", ...

    def to_dict(self) -> dict:
        return asdict(self)


_ANSWER_RE = re.compile(re.escape(ANSWER) + r"(.*?)" + re.escape(END_ANSWER), re.DOTALL)
_WELL_FORMED_RE = re.compile(
    r"\s*" + re.escape(THINK) + r"(.*?)" + re.escape(END_THINK) + r"\s*" + re.escape(ANSWER) + r"(.*?)"
    + re.escape(END_ANSWER) + r"\s*", re.DOTALL)
# Trailing markup a decoder may leave on a completion (we strip it before judging the format).
_TRAILING_RE = re.compile(r"(<\|eos\|>|<\|pad\|>|\s)*\Z")


def completion_part(text: str) -> str:
    """If given a whole rendered chat, judge only what follows the last assistant marker (as TinyZero does)."""
    return text.rsplit(ASSISTANT, 1)[-1]


def extract_answer(completion: str) -> str | None:
    """The stripped text inside the single <answer>...</answer>; None when there is none or more than one, so a
    model cannot hedge by listing several answers."""
    text = completion_part(completion)
    found = _ANSWER_RE.findall(text)
    if len(found) != 1 or text.count(ANSWER) != 1 or text.count(END_ANSWER) != 1:
        return None
    return found[0].strip()


def is_well_formed(completion: str) -> bool:
    text = _TRAILING_RE.sub("", completion_part(completion))
    m = _WELL_FORMED_RE.fullmatch(text)
    if not m:
        return False
    return all(text.count(tag) == 1 for tag in (THINK, END_THINK, ANSWER, END_ANSWER))


def score(completion: str, judge: Callable[[str], str | None], config: RewardConfig | None) -> Reward:
    """Shared reward logic: `judge(answer)` returns None when the answer is right, else a short reason."""
    config = config or RewardConfig()
    fmt = 1.0 if is_well_formed(completion) else 0.0
    answer = extract_answer(completion)
    if answer is None:
        return Reward(total=config.format_weight * fmt, accuracy=0.0, format=fmt, answer=None, reason="no answer")
    problem_with_answer = judge(answer)
    accuracy = 1.0 if problem_with_answer is None else 0.0
    base = config.correct if accuracy else config.format_credit
    return Reward(total=base + config.format_weight * fmt, accuracy=accuracy, format=fmt, answer=answer,
                  reason=problem_with_answer or "correct")


# ---------------------------------------------------------------------------------------------- splits
def split_of(task: str, key: str) -> str:
    """'eval' or 'train' for a canonical problem key; stable across runs, machines and Python versions."""
    digest = hashlib.sha256(f"{task}:{key}".encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "big") % EVAL_BUCKETS == 0 else "train"


def sample_split(task: str, generate: Callable[[random.Random, int], Problem], key: Callable[[Problem], str],
                 split: str, index: int, difficulty: int, max_tries: int = 10_000) -> Problem:
    """The `index`-th problem of a split: deterministic, and never a problem of the other split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use 'train' or 'eval'")
    rng = random.Random(f"{task}/{split}/{difficulty}/{index}")  # str seeds hash stably (not PYTHONHASHSEED)
    for _ in range(max_tries):
        p = generate(rng, difficulty)
        if split_of(task, key(p)) == split:
            return p
    raise RuntimeError(f"{task}: no {split} problem found at difficulty {difficulty} in {max_tries} draws")


class Task(Protocol):
    """The shape of a task module (structural: modules satisfy it without inheriting anything)."""

    NAME: str
    DIFFICULTIES: range
    CORPUS_DIFFICULTIES: range
    DEFAULT_DIFFICULTY: int

    def generate(self, rng: random.Random, difficulty: int) -> Problem: ...
    def key(self, problem: Problem) -> str: ...
    def prompt(self, problem: Problem) -> str: ...
    def solution(self, problem: Problem, rng: random.Random | None = None) -> str: ...
    def verify(self, problem: Problem, completion: str, config: RewardConfig | None = None) -> Reward: ...
    def sample(self, split: str, index: int, difficulty: int | None = None) -> Problem: ...
