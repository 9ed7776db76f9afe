"""The training loop and pretraining: resumable to the bit after kill -9, schedules, bad inputs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanoseek.cli import main
from nanoseek.train.loop import TrainConfig, lr_multiplier

ARGS = ["--preset", "smoke", "--data", "builtin:300", "--batch-size", "4", "--seq-len", "32",
        "--set", "eval_every=4", "--set", "eval_batches=2", "--set", "warmup_steps=2"]


def _losses(run: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r["step"] for r in lines]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {r["step"]: r["loss"] for r in lines}


def test_kill_9_then_resume_gives_the_uninterrupted_losses(tmp_path):
    steps = 12
    assert main(["pretrain", *ARGS, "--run", str(tmp_path / "a"), "--steps", str(steps),
                 "--set", "checkpoint_every=100"]) == 0
    reference = _losses(tmp_path / "a")

    run_b = tmp_path / "b"
    cmd = [sys.executable, "-m", "nanoseek", "pretrain", *ARGS, "--run", str(run_b), "--steps", str(steps),
           "--set", "checkpoint_every=3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (run_b / "checkpoints" / "step_6" / "state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_b / "model").exists()  # it really died part-way

    assert main(["pretrain", *ARGS, "--run", str(run_b), "--steps", str(steps), "--set", "checkpoint_every=3",
                 "--resume"]) == 0
    resumed = _losses(run_b)
    assert sorted(resumed) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert abs(resumed[step] - reference[step]) <= 1e-6, f"step {step}"
    receipt = json.loads((run_b / "receipt.json").read_text())
    assert receipt["tokens"] == steps * 4 * 32 and receipt["device_hours"] > 0
    assert (run_b / "model" / "config.json").exists() and (run_b / "model" / "tokenizer.json").exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "r"
    assert main(["pretrain", *ARGS, "--run", str(run), "--steps", "4"]) == 0
    return run


def test_a_run_directory_is_never_reused_for_a_different_run(finished_run, capsys):
    assert main(["pretrain", *ARGS, "--run", str(finished_run), "--steps", "4", "--lr", "0.01"]) == 2
    assert "already holds a different run" in capsys.readouterr().err
    assert main(["pretrain", *ARGS, "--run", str(finished_run), "--steps", "4"]) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_resume_against_a_run_of_another_config_is_refused(finished_run, capsys):
    before = (finished_run / "config.json").read_text()
    assert main(["pretrain", *ARGS, "--run", str(finished_run), "--steps", "4", "--resume",
                 "--set", "hidden_size=64"]) == 2
    err = capsys.readouterr().err
    assert "cannot --resume" in err and "hidden_size" in err and len(err.strip().splitlines()) == 1
    assert (finished_run / "config.json").read_text() == before


def test_resume_with_a_longer_budget_continues(finished_run):
    assert main(["pretrain", *ARGS, "--run", str(finished_run), "--steps", "6", "--resume"]) == 0
    assert max(_losses(finished_run)) == 6


@pytest.mark.parametrize("extra, message", [
    (["--data", "missing.txt"], "missing.txt"),
    (["--set", "not_a_field=1"], "no field 'not_a_field'"),
    ([], "--steps, --tokens or --minutes"),
])
def test_bad_inputs_are_one_clear_line(tmp_path, capsys, extra, message):
    args = ["pretrain", *ARGS, "--run", str(tmp_path / "r")] + extra
    if extra:
        args += ["--steps", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_model_vocab_smaller_than_the_given_tokenizer(tmp_path, capsys):
    assert main(["tokenizer", "train", "--data", "builtin:300", "--vocab-size", "700", "--out", str(tmp_path / "tok")]) == 0
    assert main(["pretrain", *ARGS, "--tokenizer", str(tmp_path / "tok"), "--run", str(tmp_path / "r"),
                 "--steps", "2", "--set", "vocab_size=300"]) == 2  # the tokenizer has over 400
    err = capsys.readouterr().err.strip()
    assert "smaller than the tokenizer" in err and len(err.splitlines()) == 1


def test_empty_and_unknown_data(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "data.xyz").write_text("hello")
    for path, message in ((tmp_path / "empty.txt", "no documents"), (tmp_path / "data.xyz", ".xyz")):
        assert main(["pretrain", *ARGS, "--data", str(path), "--run", str(tmp_path / path.stem), "--steps", "2"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err.lower() or message in err
        assert len(err.splitlines()) == 1


def test_run_directory_holding_something_else_is_refused(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "notes.txt").write_text("mine")
    assert main(["pretrain", *ARGS, "--run", str(tmp_path / "r"), "--steps", "2"]) == 2
    assert "not a nanoseek run" in capsys.readouterr().err
    assert (tmp_path / "r" / "notes.txt").read_text() == "mine"


def test_schedules():
    cos = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(cos, 0, 0.0) == pytest.approx(0.1)
    assert lr_multiplier(cos, 50, 0.5) == pytest.approx(0.55)
    assert lr_multiplier(cos, 99, 1.0) == pytest.approx(0.1)
    wsd = TrainConfig(steps=100, warmup_steps=0, schedule="wsd", decay_frac=0.2, min_lr_ratio=0.0)
    assert lr_multiplier(wsd, 50, 0.5) == 1.0 and lr_multiplier(wsd, 90, 0.9) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(steps=1, schedule="linear").validate()


@pytest.mark.slow  # compiling the layers takes a minute or two on a 2-core CPU
def test_compiled_layers_train_like_eager_ones(finished_run, tmp_path):
    assert main(["pretrain", *ARGS, "--run", str(tmp_path / "c"), "--steps", "4", "--compile"]) == 0
    eager, compiled = _losses(finished_run), _losses(tmp_path / "c")
    for step in range(1, 5):
        assert abs(eager[step] - compiled[step]) < 1e-3 * abs(eager[step]), f"step {step}"
