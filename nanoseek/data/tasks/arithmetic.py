"""Arithmetic: multi-digit +, - and * with worked, digit-by-digit solutions.

Difficulty d is the number of digits of the longer operand (1..6 are useful; larger works). The other operand has
1..d digits (1..ceil(d/2) for *, so long multiplication stays a few hundred tokens up to d=4). Subtraction may
go negative: the trace then subtracts the other way round and negates.

The traces run the school algorithms right to left, one column per line, and repeat the digits written "so far"
so that the final answer is always the last thing written, never a reversal the model must do in its head:

    <think>
    347 + 582, add the columns from the right.
    7+2+0=9, so far 9, carry 0
    4+8+0=12, so far 29, carry 1
    3+5+1=9, so far 929, carry 0
    </think><answer>929</answer>
"""

from __future__ import annotations

import random
import re

from nanoseek.data.tasks.base import (ANSWER, END_ANSWER, END_THINK, INSTRUCTION, THINK, Problem, Reward,
                                      RewardConfig, sample_split, score)

NAME = "arithmetic"
DIFFICULTIES = range(1, 7)
CORPUS_DIFFICULTIES = range(1, 4)  # the built-in pretraining corpus: short problems (see tasks/__init__.py)
DEFAULT_DIFFICULTY = 3
OPS = ("+", "-", "*")
_INT_RE = re.compile(r"-?(0|[1-9][0-9]*)")
_MAX_ANSWER_CHARS = 40  # far more digits than any answer here; stops int() from chewing on a megabyte of 9s


def _random_int(rng: random.Random, digits: int) -> int:
    """A uniformly random number with exactly `digits` digits (0..9 when digits == 1)."""
    if digits == 1:
        return rng.randint(0, 9)
    return rng.randint(10 ** (digits - 1), 10 ** digits - 1)


def generate(rng: random.Random, difficulty: int = DEFAULT_DIFFICULTY) -> Problem:
    if difficulty < 1:
        raise ValueError(f"arithmetic difficulty must be at least 1 (digits), got {difficulty}")
    op = rng.choice(OPS)
    other_max = (difficulty + 1) // 2 if op == "*" else difficulty
    long_ = _random_int(rng, difficulty)
    short = _random_int(rng, rng.randint(1, other_max))
    a, b = (long_, short) if rng.random() < 0.5 else (short, long_)
    return Problem(task=NAME, difficulty=difficulty, data={"a": a, "b": b, "op": op})


def answer(problem: Problem) -> int:
    a, b, op = problem["a"], problem["b"], problem["op"]
    return a + b if op == "+" else a - b if op == "-" else a * b


def key(problem: Problem) -> str:
    """a+b and b+a (and a*b, b*a) are one problem, so they always land in the same split."""
    a, b, op = problem["a"], problem["b"], problem["op"]
    if op in "+*":
        a, b = sorted((a, b))
    return f"{a}{op}{b}"


def prompt(problem: Problem) -> str:
    # The instruction first and the problem last (R1-Zero's template does the same): the operands then sit a few
    # tokens before the trace that copies them, which a small model learns to do far sooner (measured on `tiny`).
    return f"{INSTRUCTION} Compute {problem['a']} {problem['op']} {problem['b']}."


def sample(split: str, index: int, difficulty: int | None = None) -> Problem:
    return sample_split(NAME, generate, key, split, index, DEFAULT_DIFFICULTY if difficulty is None else difficulty)


# ---------------------------------------------------------------------------------------------- worked solutions
def _digits(n: int, width: int) -> list[int]:
    """Least significant digit first, padded with zeros to `width`."""
    return [int(c) for c in reversed(str(n).zfill(width))]


def _add_lines(a: int, b: int) -> tuple[list[str], int]:
    width = max(len(str(a)), len(str(b)))
    da, db = _digits(a, width), _digits(b, width)
    lines, written, carry = [], "", 0
    for x, y in zip(da, db):
        s = x + y + carry
        written = str(s % 10) + written
        lines.append(f"{x}+{y}+{carry}={s}, so far {written}, carry {s // 10}")
        carry = s // 10
    if carry:
        written = str(carry) + written
        lines.append(f"the last carry {carry} goes in front, so far {written}")
    return lines, int(written)


def _sub_lines(a: int, b: int) -> tuple[list[str], int]:
    """a - b for a >= b >= 0, with borrows."""
    width = len(str(a))
    da, db = _digits(a, width), _digits(b, width)
    lines, written, borrow = [], "", 0
    for x, y in zip(da, db):
        if x - y - borrow >= 0:
            d, new_borrow = x - y - borrow, 0
            lines.append(f"{x}-{y}-{borrow}={d}, so far {d}{written}, borrow 0")
        else:
            d, new_borrow = 10 + x - y - borrow, 1
            lines.append(f"{x}-{y}-{borrow} is negative, 1{x}-{y}-{borrow}={d}, so far {d}{written}, borrow 1")
        written, borrow = str(d) + written, new_borrow
    result = int(written)
    if written != str(result):
        lines.append(f"drop the leading zeros: {result}")
    return lines, result


def _mul_row(top: int, digit: int) -> tuple[list[str], int]:
    """top * one digit, right to left with carries, on one line."""
    steps, written, carry = [], "", 0
    for x in _digits(top, len(str(top))):
        p = x * digit + carry
        steps.append(f"{x}*{digit}+{carry}={p}")
        written, carry = str(p % 10) + written, p // 10
    if carry:
        written = str(carry) + written
    return steps, int(written)


def _mul_lines(a: int, b: int) -> tuple[list[str], int]:
    # Multiply the longer number by each digit of the shorter: fewer rows, shorter trace.
    top, bottom = (a, b) if len(str(a)) >= len(str(b)) else (b, a)
    lines = [f"{a} * {b}, multiply {top} by each digit of {bottom} from the right."]
    rows = []
    for place, digit in enumerate(_digits(bottom, len(str(bottom)))):
        steps, row = _mul_row(top, digit)
        shifted = row * 10 ** place
        line = f"{top}*{digit}: {', '.join(steps)}, so {row}"
        if place and shifted:
            line += f", shifted {shifted}"
        lines.append(line)
        rows.append(shifted)
    total = rows[0]
    for row in rows[1:]:
        lines.append(f"add {total} + {row}:")
        add, total = _add_lines(total, row)
        lines += add
    return lines, total


def solution(problem: Problem, rng: random.Random | None = None) -> str:
    """The worked trace; deterministic (rng is accepted for the common task interface and unused)."""
    a, b, op = problem["a"], problem["b"], problem["op"]
    if op == "+":
        lines, result = _add_lines(a, b)
        lines.insert(0, f"{a} + {b}, add the columns from the right.")
    elif op == "-":
        if a >= b:
            lines, result = _sub_lines(a, b)
            lines.insert(0, f"{a} - {b}, subtract the columns from the right.")
        else:
            lines, diff = _sub_lines(b, a)
            lines.insert(0, f"{a} - {b}: {b} is bigger, so compute {b} - {a} and negate.")
            result = -diff
            lines.append(f"negate: {result}")
    else:
        lines, result = _mul_lines(a, b)
    assert result == answer(problem), (problem, result)  # the trace is computed, so check it against Python
    return f"{THINK}\n" + "\n".join(lines) + f"\n{END_THINK}{ANSWER}{result}{END_ANSWER}"


# ---------------------------------------------------------------------------------------------- verifier
def check_answer(problem: Problem, text: str) -> str | None:
    """None if `text` is exactly the right integer, else why not."""
    if len(text) > _MAX_ANSWER_CHARS or not _INT_RE.fullmatch(text):
        return "not an integer"
    return None if int(text) == answer(problem) else "wrong value"


def verify(problem: Problem, completion: str, config: RewardConfig | None = None) -> Reward:
    return score(completion, lambda text: check_answer(problem, text), config)
