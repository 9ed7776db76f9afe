"""Countdown: reach a target from a few numbers with + - * /, each number used exactly once (TinyZero's rule).

Difficulty d is how many numbers are given (2..6; TinyZero uses 3 and 4). Numbers are 1..MAX_NUMBER; the target
comes from combining the numbers at random with the same moves the solver uses (positive integers only: a - b
needs a > b, a / b needs b to divide a), so every problem has a solution.

The worked solution is the log of a real depth-first search. From the current numbers it tries a move (combine
two numbers into one), recurses, and when two numbers are left it checks every way to combine them. Moves are
tried in a heuristic order (result closest to the target first, random tie-breaks), and every failure is written
down with the state it backs up to:

    numbers 3 7 25, target 46
    try 25+7=32, left 3 32
    32 and 3: 32+3=35, 32-3=29, 32*3=96, no
    back to 3 7 25
    try 25-7=18, ...

To keep traces short for small models the search has a budget of `max_dead_ends` failed checks: after that it
stops guessing and takes a move it has verified (by an exhaustive solve done first) reaches the target. Every
line is still true arithmetic, every "no" a real dead end, and the trace always ends in a verified expression.

The verifier follows TinyZero: 0 without a single <answer>; 0.1 (format credit) when the answer is there but
uses other numbers, has characters beyond digits, + - * / ( ) and spaces, fails to parse or evaluate, or misses
the target; 1.0 when right. Expressions are parsed by a small recursive-descent parser over exact fractions,
never by `eval`, and must be short: `9**9**9` is a parse error, not a hang.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

from nanoseek.data.tasks.base import (ANSWER, END_ANSWER, END_THINK, INSTRUCTION, THINK, Problem, Reward,
                                      RewardConfig, sample_split, score)

NAME = "countdown"
DIFFICULTIES = range(2, 6)
CORPUS_DIFFICULTIES = range(2, 4)  # the built-in pretraining corpus: short problems (see tasks/__init__.py)
DEFAULT_DIFFICULTY = 3
MAX_NUMBER = 25
MAX_TARGET = 250
MAX_DEAD_ENDS = 3  # how many failed checks a worked solution may show before it goes straight to the answer
_MAX_EXPR_CHARS = 100
_ALLOWED_RE = re.compile(r"[0-9+\-*/() ]*")
_TOKEN_RE = re.compile(r"\d+|[+\-*/()]")


def _moves(values: tuple[int, ...]) -> list[tuple[int, str, int, int, tuple[int, ...]]]:
    """Every (x, op, y, result, remaining) from combining two of `values` (x >= y), duplicates removed."""
    out, seen = [], set()
    for i in range(len(values)):
        for j in range(len(values)):
            x, y = values[i], values[j]
            if i == j or x < y or (x == y and i > j):
                continue
            rest = tuple(v for k, v in enumerate(values) if k not in (i, j))
            for op, r in (("+", x + y), ("-", x - y), ("*", x * y), ("/", x // y if x % y == 0 else 0)):
                if r <= 0 or (x, op, y) in seen:
                    continue
                seen.add((x, op, y))
                out.append((x, op, y, r, rest + (r,)))
    return out


@lru_cache(maxsize=200_000)
def _solvable(values: tuple[int, ...], target: int) -> bool:
    """Exhaustive: can `values` (sorted) be combined, using all of them, into `target`?"""
    if len(values) == 1:
        return values[0] == target
    return any(_solvable(tuple(sorted(rest)), target) for *_, rest in _moves(values))


def solvable(numbers: list[int], target: int) -> bool:
    return _solvable(tuple(sorted(numbers)), target)


def generate(rng: random.Random, difficulty: int = DEFAULT_DIFFICULTY) -> Problem:
    if not 2 <= difficulty <= 6:
        raise ValueError(f"countdown difficulty is the count of numbers, 2 to 6; got {difficulty}")
    while True:
        numbers = [rng.randint(1, MAX_NUMBER) for _ in range(difficulty)]
        pool = list(numbers)
        while len(pool) > 1:  # combine two random numbers with a random legal move until one is left
            i, j = rng.sample(range(len(pool)), 2)
            x, y = max(pool[i], pool[j]), min(pool[i], pool[j])
            options = [x + y, x * y] + ([x - y] if x > y else []) + ([x // y] if x % y == 0 else [])
            pool = [v for k, v in enumerate(pool) if k not in (i, j)] + [rng.choice(options)]
        if 1 <= pool[0] <= MAX_TARGET:
            return Problem(task=NAME, difficulty=difficulty, data={"numbers": numbers, "target": pool[0]})


def key(problem: Problem) -> str:
    """The order the numbers are listed in does not make a new problem."""
    return f"{sorted(problem['numbers'])}->{problem['target']}"


def prompt(problem: Problem) -> str:
    return (f"{INSTRUCTION} Using the numbers {problem['numbers']}, make {problem['target']}. "
            f"Use + - * / and each number exactly once.")


def sample(split: str, index: int, difficulty: int | None = None) -> Problem:
    return sample_split(NAME, generate, key, split, index, DEFAULT_DIFFICULTY if difficulty is None else difficulty)


# ---------------------------------------------------------------------------------------------- the search
@dataclass
class Search:
    lines: list[str]  # the trace, one step per line
    expression: str  # the solution, e.g. "(50+25)+(7*3)"
    dead_ends: int  # failed checks shown in the trace
    first_try_solvable: bool  # whether the heuristic's first move could have worked (else the trace must back up)


def _fmt(pool: list[tuple[int, str]]) -> str:
    return " ".join(str(v) for v, _ in sorted(pool))


def _wrap(expr: str) -> str:
    return expr if expr.isdigit() else f"({expr})"


def search(numbers: list[int], target: int, rng: random.Random | None = None,
           max_dead_ends: int = MAX_DEAD_ENDS) -> Search:
    """Depth-first search for an expression, logged as a worked solution (see the module docstring)."""
    if not solvable(numbers, target):
        raise ValueError(f"countdown: {numbers} cannot make {target}")
    rng = rng or random.Random(0)
    lines = [f"numbers {' '.join(map(str, sorted(numbers)))}, target {target}"]
    path: list[str] = []  # the moves from the start to the current state, for the summary line
    dead_ends = 0
    first_try: list[bool] = []

    def ordered(pool):
        """Moves on (value, expression) pairs, closest result to the target first, random tie-breaks."""
        cands = []
        for i in range(len(pool)):
            for j in range(len(pool)):
                (x, ex), (y, ey) = pool[i], pool[j]
                if i == j or x < y or (x == y and i > j):
                    continue
                rest = [p for k, p in enumerate(pool) if k not in (i, j)]
                for op, r in (("+", x + y), ("-", x - y), ("*", x * y), ("/", x // y if x % y == 0 else 0)):
                    if r > 0:
                        cands.append((abs(r - target), rng.random(), f"{x}{op}{y}={r}",
                                      rest + [(r, f"{_wrap(ex)}{op}{_wrap(ey)}")]))
        cands.sort(key=lambda c: (c[0], c[1]))
        seen, out = set(), []
        for _, _, text, new in cands:  # equal numbers give the same move twice; try it once
            if text not in seen:
                seen.add(text)
                out.append((text, new))
        return out

    def check(pool) -> str | None:
        """Two numbers left: try each way to combine them; the expression if one hits the target."""
        nonlocal dead_ends
        (x, ex), (y, ey) = sorted(pool, reverse=True)
        tried = []
        for op, r in (("+", x + y), ("-", x - y), ("*", x * y), ("/", x // y if x % y == 0 else 0)):
            if r <= 0:
                continue
            tried.append(f"{x}{op}{y}={r}")
            if r == target:
                lines.append(f"{x} and {y}: {', '.join(tried)}, found it")
                path.append(f"{x}{op}{y}={r}")
                return f"{_wrap(ex)}{op}{_wrap(ey)}"
        lines.append(f"{x} and {y}: {', '.join(tried)}, no")
        dead_ends += 1
        return None

    def dfs(pool) -> str | None:
        if len(pool) == 1:  # only reachable when the problem itself has one number
            return pool[0][1] if pool[0][0] == target else None
        if len(pool) == 2:
            return check(pool)
        for text, new in ordered(pool):
            works = solvable([v for v, _ in new], target)
            if not first_try:
                first_try.append(works)
            if not works and dead_ends >= max_dead_ends:
                continue  # out of budget for guesses: only take moves known to reach the target
            lines.append(f"try {text}, left {_fmt(new)}")
            path.append(text)
            found = dfs(new)
            if found is not None:
                return found
            path.pop()
            if lines[-1].startswith("back to "):  # unwinding several levels: only where we land matters
                lines.pop()
            lines.append(f"back to {_fmt(pool)}")
        return None

    expression = dfs([(n, str(n)) for n in numbers])
    assert expression is not None  # the problem is solvable and solvable moves are never skipped
    if len(path) > 1:
        lines.append(f"so {', '.join(path)}")
    return Search(lines=lines, expression=expression, dead_ends=dead_ends,
                  first_try_solvable=first_try[0] if first_try else True)


def solution(problem: Problem, rng: random.Random | None = None, max_dead_ends: int = MAX_DEAD_ENDS) -> str:
    s = search(problem["numbers"], problem["target"], rng, max_dead_ends)
    assert check_answer(problem, s.expression) is None, (problem, s.expression)
    return f"{THINK}\n" + "\n".join(s.lines) + f"\n{END_THINK}{ANSWER}{s.expression}{END_ANSWER}"


# ---------------------------------------------------------------------------------------------- verifier
class _ParseError(Exception):
    pass


def parse_expression(text: str) -> tuple[Fraction, list[int]]:
    """Evaluate `text` exactly: integers, + - * /, parentheses; no unary minus, no powers. Returns the value
    and the numbers used. Raises _ParseError for anything else and ZeroDivisionError for x/0."""
    tokens = _TOKEN_RE.findall(text)
    if "".join(tokens) != text.replace(" ", ""):
        raise _ParseError("invalid characters")
    used: list[int] = []
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def expr() -> Fraction:  # expr := term (("+" | "-") term)*
        value = term()
        while peek() in ("+", "-"):
            value = value + term() if take() == "+" else value - term()
        return value

    def term() -> Fraction:  # term := factor (("*" | "/") factor)*
        value = factor()
        while peek() in ("*", "/"):
            value = value * factor() if take() == "*" else value / factor()
        return value

    def factor() -> Fraction:  # factor := NUMBER | "(" expr ")"
        tok = peek()
        if tok is None:
            raise _ParseError("unexpected end")
        if tok.isdigit():
            take()
            used.append(int(tok))
            return Fraction(int(tok))
        if tok == "(":
            take()
            value = expr()
            if peek() != ")":
                raise _ParseError("missing )")
            take()
            return value
        raise _ParseError(f"unexpected {tok!r}")

    value = expr()
    if pos != len(tokens):
        raise _ParseError(f"unexpected {tokens[pos]!r}")
    return value, used


def check_answer(problem: Problem, text: str) -> str | None:
    """None if `text` is an expression using each given number exactly once and equal to the target."""
    if len(text) > _MAX_EXPR_CHARS:
        return "too long"
    if not _ALLOWED_RE.fullmatch(text):
        return "invalid characters"
    try:
        value, used = parse_expression(text)
    except _ParseError:
        return "malformed expression"
    except ZeroDivisionError:
        return "division by zero"
    if Counter(used) != Counter(problem["numbers"]):
        return "wrong numbers"
    # Exact fractions, so TinyZero's 1e-5 tolerance is only a formality here.
    return None if abs(value - problem["target"]) < Fraction(1, 100_000) else "wrong value"


def verify(problem: Problem, completion: str, config: RewardConfig | None = None) -> Reward:
    return score(completion, lambda text: check_answer(problem, text), config)
