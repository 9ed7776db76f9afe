"""Evaluation: the unbiased pass@k estimator, maj@k, the JSONL path, `nanoseek eval` end to end, bad inputs."""

import json
import math

import pytest

from nanoseek.cli import main
from nanoseek.evaluate import evaluate_rows, ks_for, majority_vote, pass_at_k, read_eval_jsonl
from nanoseek.infer.engine import Engine, Output


@pytest.mark.parametrize("n, c, k", [(1, 0, 1), (1, 1, 1), (4, 1, 1), (4, 1, 2), (5, 2, 3), (10, 3, 4), (8, 8, 8),
                                     (8, 0, 8), (6, 5, 2)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # pass@1 = c/n
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_majority_vote():
    assert majority_vote(["5", " 5", "6", None]) == "5"
    assert majority_vote(["6", "5", "5", "6"]) == "6"  # a tie goes to the answer seen first
    assert majority_vote([None, " "]) is None
    assert ks_for(8) == [1, 2, 4, 8] and ks_for(6) == [1, 2, 4, 6]


class ScriptedEngine(Engine):
    def __init__(self, texts):
        self.texts, self.tokenizer = texts, object()

    def generate(self, prompts, max_tokens=256, **kw):
        assert len(prompts) == len(self.texts)
        return [Output(str(i), [0], [1] * 3, t, "", "", "stop") for i, t in enumerate(self.texts)]


def test_jsonl_rows_pass_and_maj(tmp_path):
    f = tmp_path / "eval.jsonl"
    f.write_text('{"prompt": "1+1?", "answer": "2"}\n\n{"prompt": "2+2?", "answer": 4}\n')
    rows = read_eval_jsonl(f)
    a = lambda x: f"<think>t</think><answer>{x}</answer>"  # noqa: E731
    # problem 1: 1 of 3 right, but the majority (3, 3) is wrong; problem 2: 2 of 3 right, majority right
    texts = [a(2), a(3), a(3), a(4), "junk", a(4)]
    s = evaluate_rows(ScriptedEngine(texts), None, rows, samples=3, temperature=0.6)
    assert s["pass@1"] == pytest.approx(3 / 6)
    assert s["pass@2"] == pytest.approx((pass_at_k(3, 1, 2) + pass_at_k(3, 2, 2)) / 2)
    assert s["maj@3"] == pytest.approx(0.5) and s["maj@1"] == pytest.approx(1.0)
    assert s["format_rate"] == pytest.approx(5 / 6)
    assert s["problems"][1]["answers"] == ["4", None, "4"]


def test_greedy_with_several_samples_is_refused():
    with pytest.raises(ValueError, match="temperature > 0"):
        evaluate_rows(ScriptedEngine([]), None, [{"prompt": "x", "answer": "1"}], samples=2, temperature=0.0)


def test_nanoseek_eval_task_and_jsonl(smoke_model, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", str(smoke_model), "--task", "arithmetic", "--num", "2", "--difficulty", "1,2",
                 "--samples", "2", "--max-tokens", "6", "--out", str(out)]) == 0
    s = json.loads(out.read_text())
    for key in ("pass@1", "pass@2", "maj@2", "format_rate", "mean_length", "problems"):
        assert key in s
    assert s["task"] == "arithmetic" and s["num"] == 2 and s["temperature"] == 0.6
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "Compute 1 + 1.", "answer": "2"}\n')
    assert main(["eval", str(smoke_model / "model"), "--data", str(data), "--max-tokens", "4"]) == 0
    assert '"pass@1": 0.0' in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--task", "nope"], "unknown task"),
    (["--data", "BAD"], "line 1 needs a \"prompt\""),
    (["--data", "MISSING"], "does not exist"),
    (["--task", "arithmetic", "--samples", "2", "--temperature", "0"], "temperature > 0"),
])
def test_bad_eval_inputs_are_one_line(smoke_model, tmp_path, capsys, args, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n')
    args = [str(bad) if a == "BAD" else str(tmp_path / "none.jsonl") if a == "MISSING" else a for a in args]
    assert main(["eval", str(smoke_model), *args, "--num", "1", "--max-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
