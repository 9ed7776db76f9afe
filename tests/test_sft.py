"""SFT: only assistant tokens are trained, conversations are packed whole, `nanoseek sft` end to end, bad data as
one-line errors; distillation keeps only verified-correct traces."""

import json

import pytest
import torch

from nanoseek.cli import main
from nanoseek.data.tasks import get_task
from nanoseek.infer.engine import Engine, Output
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.sft import IGNORE_INDEX, RowBatches, inputs_targets, pack_conversations, teacher_traces
from conftest import routing_biases

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compute 2 + 3."},
        {"role": "assistant", "content": "<think>2+3=5</think><answer>5</answer>"},
        {"role": "user", "content": "And 4 + 4?"}, {"role": "assistant", "content": "<answer>8</answer>"}]


@pytest.fixture(scope="module")
def tok(smoke_model):
    return Tokenizer.load(smoke_model / "model")


def test_only_assistant_tokens_are_targets(tok):
    ids, mask, truncated = pack_conversations(tok, [CONV], seq_len=127)
    assert truncated == 0 and ids.shape == (1, 128)
    inputs, targets = inputs_targets(ids, mask)
    trained = targets[targets != IGNORE_INDEX].tolist()
    # exactly the two assistant turns, each with its closing EOS, and nothing of the system or user text
    want = tok.encode(CONV[2]["content"]) + [tok.eos_id] + tok.encode(CONV[4]["content"]) + [tok.eos_id]
    assert trained == want
    assert (targets[0, (ids[0, 1:] == tok.pad_id)] == IGNORE_INDEX).all()  # padding is never a target
    assert torch.equal(inputs, ids[:, :-1])


def test_conversations_are_packed_whole(tok):
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    n = len(tok.encode_chat(short)[0])
    ids, mask, _ = pack_conversations(tok, [short] * 5, seq_len=2 * n)  # rows of 2n+1 tokens hold two each
    assert ids.shape[0] == 3
    assert [int((row == tok.bos_id).sum()) for row in ids] == [2, 2, 1]
    assert all(row[0] == tok.bos_id for row in ids)
    long = [{"role": "user", "content": "x " * 200}, {"role": "assistant", "content": "y"}]
    assert pack_conversations(tok, [long], seq_len=32)[2] == 1  # too long for a row: truncated, counted


def test_row_batches_resume_exactly(tok):
    ids, mask, _ = pack_conversations(tok, [CONV] * 7, seq_len=40)
    a = RowBatches(ids, mask, batch_size=3, seed=1)
    for _ in range(4):
        next(a)
    b = RowBatches(ids, mask, batch_size=3, seed=1)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(next(a), next(b)))


def test_nanoseek_sft_end_to_end(smoke_model, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": CONV}) + "\n" for _ in range(30)))
    run = tmp_path / "sft"
    assert main(["sft", "--init", str(smoke_model), "--run", str(run), "--data", str(data), "--steps", "2",
                 "--batch-size", "2", "--seq-len", "64"]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["stage"] == "sft" and rows[-1]["trained_tokens"] > 0 and "val_loss" in rows[-1]
    assert (run / "model" / "tokenizer.json").exists() and (run / "receipt.json").exists()
    before, after = routing_biases(smoke_model / "model"), routing_biases(run / "model")
    assert before and all(torch.equal(before[k], after[k]) for k in before)  # the routing bias stays frozen


def test_fp8_sft_runs_where_fp8_is_emulated(smoke_model, tmp_path):
    """--precision fp8 on a device without FP8 units: the GEMMs are emulated in fp32, and MFU and the receipt say
    so (this used to stop with "device cpu has no fp8 peak")."""
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": CONV}) + "\n" for _ in range(8)))
    run = tmp_path / "sft8"
    assert main(["sft", "--init", str(smoke_model), "--run", str(run), "--data", str(data), "--steps", "1",
                 "--batch-size", "2", "--seq-len", "64", "--precision", "fp8"]) == 0
    assert json.loads((run / "receipt.json").read_text())["precision"] == "fp32"


@pytest.mark.parametrize("content, message", [
    ('{"messages": []}\n', "line 1 needs a \"messages\" list"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "no assistant message"),
    ('not json\n', "line 1 is not valid JSON"),
    ('', "holds no conversations"),
])
def test_bad_sft_data_is_one_line(smoke_model, tmp_path, capsys, content, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    assert main(["sft", "--init", str(smoke_model), "--run", str(tmp_path / "r"), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("stage", ["sft", "distill"])
def test_a_pass_count_that_is_not_positive_is_one_line(smoke_model, tmp_path, capsys, stage):
    source = ["--data", str(tmp_path / "unused.jsonl")] if stage == "sft" else ["--teacher", str(smoke_model)]
    args = [stage, "--init" if stage == "sft" else "--student-init", str(smoke_model), *source, "--run",
            str(tmp_path / "r"), "--epochs", "0"] + (["--task", "arithmetic"] if stage == "distill" else [])
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "--epochs must be > 0" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()  # refused before anything was written


class ScriptedEngine(Engine):
    """Answers from a script instead of a model: the n-th request gets the n-th text."""

    def __init__(self, texts, tokenizer):
        self.texts, self.tokenizer = texts, tokenizer

    def generate(self, prompts, max_tokens=256, **kw):
        return [Output(str(i), [0], [1] * 5, t, "", "", "stop") for i, t in enumerate(self.texts[:len(prompts)])]


def test_distillation_keeps_only_verified_traces(tok):
    task = get_task("arithmetic")
    from nanoseek.evaluate import task_problems

    p0, p1 = task_problems(task, 2, 1, seed=1, split="train")
    right0, right1 = task.solution(p0), task.solution(p1)
    texts = [right0, right0, "<think>hmm</think><answer>-99999</answer>",  # prompt 0: two equal right answers
             "<answer>" + right1.split("<answer>")[1], "no tags at all", right1]  # prompt 1: malformed, junk, right
    rows, stats = teacher_traces(ScriptedEngine(texts, tok), "arithmetic", num_prompts=2, samples=3, difficulty=1,
                                 progress=False)
    assert stats["correct"] == 3 and stats["prompts_solved"] == 2 and len(rows) == 2  # one distinct trace each
    assert [r["messages"][1]["content"] for r in rows] == [right0, right1]
    assert rows[0]["messages"][0]["content"] == task.prompt(p0)
