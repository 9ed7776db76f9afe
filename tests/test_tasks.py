"""Verifiable tasks: worked solutions verify, malformed answers are rejected with the right reward, train and
eval never overlap, generation is deterministic, countdown traces really search, and the corpus mixes tasks."""

import json
import random
import time

import pytest

from nanoseek.data.tasks import (TASKS, Problem, RewardConfig, builtin_corpus, extract_answer, get_task,
                                 is_well_formed, split_of)
from nanoseek.data.tasks import arithmetic, countdown


def P(task, **data):
    return Problem(task=task, difficulty=3, data=data)


def wrap(answer, think="ok"):
    return f"<think>{think}</think><answer>{answer}</answer>"


# ---------------------------------------------------------------------------------------------- shared
def test_registry():
    assert set(TASKS) >= {"arithmetic", "countdown"}
    assert get_task("countdown") is countdown
    with pytest.raises(ValueError, match="unknown task 'chess'"):
        get_task("chess")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_solutions_verify_for_many_seeds_and_difficulties(name):
    task = get_task(name)
    for difficulty in task.DIFFICULTIES:
        for seed in range(60):
            rng = random.Random(seed)
            p = task.generate(rng, difficulty)
            sol = task.solution(p, rng)
            r = task.verify(p, sol)
            assert (r.total, r.accuracy, r.format, r.reason) == (1.0, 1.0, 1.0, "correct"), (p, sol, r)
            assert sol.startswith("<think>") and "</think><answer>" in sol and sol.endswith("</answer>")
            prompt = task.prompt(p)
            assert "<think>" in prompt and "<answer>" in prompt and len(prompt) < 200


@pytest.mark.parametrize("name", sorted(TASKS))
def test_generation_is_deterministic_and_serialisable(name):
    task = get_task(name)
    a = [task.generate(random.Random(7), d) for d in task.DIFFICULTIES]
    b = [task.generate(random.Random(7), d) for d in task.DIFFICULTIES]
    assert a == b
    for p in a:
        assert Problem.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert [task.sample("eval", i, 3) for i in range(20)] == [task.sample("eval", i, 3) for i in range(20)]
    assert task.solution(a[-1], random.Random(1)) == task.solution(a[-1], random.Random(1))


@pytest.mark.parametrize("name", sorted(TASKS))
def test_train_and_eval_never_overlap(name):
    task = get_task(name)
    train, evals = set(), set()
    for d in list(task.DIFFICULTIES)[:3]:
        for i in range(1500):
            train.add(task.key(task.sample("train", i, d)))
        for i in range(300):
            evals.add(task.key(task.sample("eval", i, d)))
    assert len(evals) > 50 and len(train) > 1000
    assert train.isdisjoint(evals)
    assert all(split_of(name, k) == "eval" for k in evals)
    with pytest.raises(ValueError, match="unknown split"):
        task.sample("test", 0)


def test_equivalent_problems_share_a_split():
    a = P("arithmetic", a=12, b=345, op="+")
    b = P("arithmetic", a=345, b=12, op="+")
    assert arithmetic.key(a) == arithmetic.key(b)
    assert arithmetic.key(P("arithmetic", a=12, b=345, op="-")) != arithmetic.key(
        P("arithmetic", a=345, b=12, op="-"))
    assert countdown.key(P("countdown", numbers=[3, 7, 25], target=46)) == countdown.key(
        P("countdown", numbers=[25, 3, 7], target=46))


def test_answer_extraction_and_format():
    assert extract_answer("<think>x</think><answer> 42 </answer>") == "42"
    assert extract_answer("no tags here") is None
    assert extract_answer("<answer>1</answer><answer>2</answer>") is None  # hedging is not an answer
    assert extract_answer("<answer>1") is None
    assert extract_answer("<|user|>say <answer>x</answer><|assistant|><think></think><answer>7</answer>") == "7"
    assert is_well_formed("<think>\nx\n</think>\n<answer>1</answer><|eos|>")
    assert not is_well_formed("<answer>1</answer>")
    assert not is_well_formed("<think>a</think><think>b</think><answer>1</answer>")
    assert not is_well_formed("<think>a</think><answer>1</answer> trailing words")


def test_reward_config():
    p = P("arithmetic", a=2, b=3, op="+")
    assert arithmetic.verify(p, wrap("6")).total == pytest.approx(0.1)
    assert arithmetic.verify(p, wrap("6"), RewardConfig(format_credit=0.0)).total == 0.0
    r1 = RewardConfig(format_credit=0.0, format_weight=1.0)  # R1: accuracy and format weighted equally
    assert arithmetic.verify(p, wrap("5"), r1).total == 2.0
    assert arithmetic.verify(p, wrap("6"), r1).total == 1.0
    assert arithmetic.verify(p, "<answer>5</answer>", r1).total == 1.0  # right, but no think block


# ---------------------------------------------------------------------------------------------- arithmetic
def test_arithmetic_difficulty_is_digit_count():
    rng = random.Random(0)
    for d in range(1, 8):
        for _ in range(50):
            p = arithmetic.generate(rng, d)
            assert max(len(str(p["a"])), len(str(p["b"]))) == d
    with pytest.raises(ValueError, match="at least 1"):
        arithmetic.generate(rng, 0)


def test_arithmetic_traces_show_the_algorithm():
    add = arithmetic.solution(P("arithmetic", a=347, b=582, op="+"))
    assert "4+8+0=12, so far 29, carry 1" in add and add.endswith("<answer>929</answer>")
    sub = arithmetic.solution(P("arithmetic", a=182, b=347, op="-"))
    assert "14-8-0=6" in sub and "negate: -165" in sub and sub.endswith("<answer>-165</answer>")
    mul = arithmetic.solution(P("arithmetic", a=347, b=25, op="*"))
    assert "347*5:" in mul and "shifted 6940" in mul and "add 1735 + 6940:" in mul
    assert mul.endswith("<answer>8675</answer>")


@pytest.mark.parametrize("completion,total,reason", [
    ("<think>easy</think><answer>929</answer>", 1.0, "correct"),
    ("<answer>929</answer>", 1.0, "correct"),  # TinyZero-style: accuracy needs only the answer tag
    ("<think>...</think><answer>928</answer>", 0.1, "wrong value"),
    ("<think>...</think><answer>929 apples</answer>", 0.1, "not an integer"),
    ("<think>...</think><answer>0929</answer>", 0.1, "not an integer"),
    ("<think>...</think><answer>" + "9" * 5000 + "</answer>", 0.1, "not an integer"),
    ("<think>...</think><answer>9**9**9</answer>", 0.1, "not an integer"),
    ("<think>...</think> 929", 0.0, "no answer"),
    ("<answer>929</answer><answer>928</answer>", 0.0, "no answer"),
    ("", 0.0, "no answer"),
])
def test_arithmetic_verifier(completion, total, reason):
    r = arithmetic.verify(P("arithmetic", a=347, b=582, op="+"), completion)
    assert (r.total, r.reason) == (pytest.approx(total), reason)


# ---------------------------------------------------------------------------------------------- countdown
CD = P("countdown", numbers=[3, 7, 25, 50], target=96)


@pytest.mark.parametrize("expr,total,reason", [
    ("50+25+7*3", 1.0, "correct"),
    ("(50 + 25) + (7 * 3)", 1.0, "correct"),
    ("3*7+25+50", 1.0, "correct"),
    ("50+25+7+3", 0.1, "wrong value"),
    ("50+25+21", 0.1, "wrong numbers"),  # 21 is not a given number
    ("50+25+7*3+3", 0.1, "wrong numbers"),  # 3 used twice
    ("50+25+7", 0.1, "wrong numbers"),  # 3 unused
    ("50+25+7*3=96", 0.1, "invalid characters"),
    ("50+25+7×3", 0.1, "invalid characters"),
    ("__import__('os')", 0.1, "invalid characters"),
    ("9**9**9", 0.1, "malformed expression"),
    ("((50+25)+7*3", 0.1, "malformed expression"),
    ("-3+7+25+50", 0.1, "malformed expression"),  # no unary minus
    ("50/(7-7)+25+3", 0.1, "division by zero"),
    ("(" * 60 + "3" + ")" * 60, 0.1, "too long"),
])
def test_countdown_verifier(expr, total, reason):
    t0 = time.perf_counter()
    r = countdown.verify(CD, wrap(expr))
    assert (r.total, r.reason) == (pytest.approx(total), reason)
    assert time.perf_counter() - t0 < 0.5


def test_countdown_verifier_tinyzero_rewards():
    assert countdown.verify(CD, "<think>hmm</think>").total == 0.0
    assert countdown.verify(CD, "50+25+7*3").total == 0.0
    assert countdown.verify(CD, wrap("50+25+7*3") + wrap("1")).total == 0.0  # two answers
    # fractions in between are fine as long as the value is exact (TinyZero evaluates with floats)
    p = P("countdown", numbers=[1, 3, 4, 6], target=24)
    assert countdown.verify(p, wrap("6/(1-3/4)")).total == 1.0


def test_countdown_targets_are_reachable_and_difficulty_is_count():
    rng = random.Random(1)
    for d in range(2, 7):
        for _ in range(20 if d < 6 else 3):
            p = countdown.generate(rng, d)
            assert len(p["numbers"]) == d and 1 <= p["target"] <= countdown.MAX_TARGET
            assert countdown.solvable(p["numbers"], p["target"])
    with pytest.raises(ValueError, match="2 to 6"):
        countdown.generate(rng, 1)


def test_countdown_traces_search_and_backtrack():
    needed = backtracked = 0
    for seed in range(200):
        p = countdown.generate(random.Random(seed), 4)
        s = countdown.search(p["numbers"], p["target"], random.Random(seed))
        text = "\n".join(s.lines)
        assert countdown.check_answer(p, s.expression) is None
        assert s.dead_ends <= countdown.MAX_DEAD_ENDS
        assert text.count(", no") == s.dead_ends
        if not s.first_try_solvable:  # the heuristic's first move cannot work: the trace must back up
            needed += 1
            assert s.dead_ends >= 1 and "back to " in text, text
        backtracked += "back to " in text
    assert needed > 30 and backtracked > 60
    # every step written in a trace is true arithmetic
    for seed in range(50):
        p = countdown.generate(random.Random(seed), 4)
        for line in countdown.solution(p, random.Random(seed)).splitlines():
            for eq in line.replace(":", ",").split(","):
                if "=" in eq:
                    lhs, rhs = eq.split("=")
                    value, _ = countdown.parse_expression(lhs.split()[-1])
                    assert value == int(rhs), line


def test_countdown_no_budget_still_solves():
    for seed in range(30):
        p = countdown.generate(random.Random(seed), 4)
        s = countdown.search(p["numbers"], p["target"], random.Random(seed), max_dead_ends=0)
        assert s.dead_ends == 0 and countdown.check_answer(p, s.expression) is None


# ---------------------------------------------------------------------------------------------- corpus
def test_builtin_corpus_is_deterministic_and_mixes_tasks():
    a = list(builtin_corpus(200, seed=5))
    assert a == list(builtin_corpus(200, seed=5))
    assert a != list(builtin_corpus(200, seed=6))
    assert len(a) == 200
    n_arith = sum("Compute " in d for d in a)
    n_count = sum("Using the numbers" in d for d in a)
    assert n_arith + n_count == 200 and n_arith > 50 and n_count > 50
    for d in a:
        assert d.startswith("<|user|>") and "<|assistant|><think>" in d and d.endswith("</answer>")
    only = list(builtin_corpus(20, seed=0, tasks=["arithmetic"], difficulties={"arithmetic": [2]}))
    assert all("Compute " in d for d in only)


def test_builtin_corpus_holds_no_eval_problem():
    for doc in builtin_corpus(300, seed=0, tasks=["arithmetic"], difficulties={"arithmetic": [1]}):
        a, op, b = doc.split("Compute ")[1].split(".")[0].split()
        assert split_of("arithmetic", arithmetic.key(P("arithmetic", a=int(a), b=int(b), op=op))) == "train"
