"""The report card: from a real tiny pretraining run and a synthetic GRPO run; sums over stages; bad inputs."""

import json
import math
import random
import re

import pytest

from nanoseek import cost, cost_tables
from nanoseek.cli import main
from nanoseek.report import read_eval, write_report

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _no_user_devices_file(tmp_path, monkeypatch):
    """A devices file in the tester's home must not change the prices under test."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("report") / "pretrain"
    rc = main(["pretrain", "--preset", "smoke", "--data", "builtin:100", "--batch-size", "4", "--seq-len", "64",
               "--steps", "4", "--set", "eval_every=2", "--run", str(run)])
    assert rc == 0
    return run


def fake_grpo_run(run, model_config, steps=120, seed=0):
    """What a GRPO stage writes, with made-up but plausible numbers: config, metrics, receipt, one eval."""
    rng = random.Random(seed)
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"stage": "grpo", "model": model_config, "train": {}, "data": {}}))
    rows, tokens = [], 0
    for step in range(1, steps + 1):
        p = 0.1 + 0.6 * (1 - math.exp(-step / 40))
        tokens += 4096
        row = {"stage": "grpo", "step": step, "loss": 0.05 * rng.random(), "reward": p + 0.05 * rng.gauss(0, 1),
               "reward_std": 0.3, "accuracy": min(1, max(0, p + 0.05 * rng.gauss(0, 1))),
               "format_rate": min(1.0, 0.5 + step / 100), "response_length": 60 + step / 2 + rng.gauss(0, 5),
               "kl": 1e-4 * step, "clip_fraction": 0.02 * rng.random(), "entropy": 1.5 - step / 200,
               "rollout_seconds": 3 + rng.random(), "update_seconds": 1 + rng.random(), "tokens": tokens,
               "tokens_per_second": 900 + 50 * rng.random(), "mfu": 0.03, "elapsed": 5.0 * step,
               "expert_load_max_over_mean": [1.2 + 0.1 * rng.random(), 1.3], "bias_norm": [0.01, 0.02]}
        if step % 20 == 0:
            row["eval_accuracy"] = p
        rows.append(row)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    receipt = cost.make_receipt("grpo", "h100", wall_seconds=5.0 * steps, tokens=tokens, flops=tokens * 6e6,
                                price_per_hour=2.5, steps=steps)
    cost.write_receipt(receipt, run / "receipt.json")
    (run / "eval_gsm8k.json").write_text(json.dumps(
        {"task": "arith", "num": 200, "pass@1": 0.41, "pass@8": 0.77, "maj@8": 0.55, "samples": 8}))
    return receipt


def _images(md: str) -> list[str]:
    return re.findall(r"!\[[^]]*\]\(([^)]+)\)", md)


def _row(md: str, first_cell: str) -> list[str]:
    line = next(line for line in md.splitlines() if line.startswith(f"| {first_cell} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def _check_images(md: str, out) -> list[str]:
    images = _images(md)
    for rel in images:
        assert not rel.startswith("/"), "image paths are relative, so the report moves with its directory"
        assert (out / rel).read_bytes()[:8] == PNG
    assert not list(out.glob(".*.tmp")), "atomic writes leave no temporary files behind"
    return images


# ---------------------------------------------------------------------------------------------- one stage
def test_report_from_real_pretraining_run(pretrain_run):
    path = write_report([pretrain_run])
    assert path == pretrain_run / "report.md"  # one run: the report lives in its run directory
    md = path.read_text()
    receipt = cost.read_receipt(pretrain_run / "receipt.json")
    header = "| stage | device | wall clock | device-hours | USD | tokens | MFU | H100-hours at 40% MFU | USD on H100 |"
    assert header in md
    assert _row(md, "pretrain")[1] == "1 x " + receipt.device
    total = _row(md, "**Total**")
    assert total[4] == "**" + ("$0" if receipt.dollars == 0 else cost_tables.usd(receipt.dollars)) + "**"
    assert "**Model**" in md and "**Device**" in md and "## Training" in md and "## Evaluation" in md
    assert f"| pretrain | {receipt.extra['steps']} |" in md  # the training table: steps
    images = _check_images(md, pretrain_run)
    assert {"pretrain_loss.png", "pretrain_throughput.png", "pretrain_experts.png"} <= set(images)
    assert "pretrain_rl.png" not in images  # no RL metrics, no RL plot


def test_report_from_grpo_like_metrics(tmp_path):
    run = tmp_path / "grpo"
    fake_grpo_run(run, _smoke_hf())
    path = write_report(run, eval_files=[run / "eval_gsm8k.json"])  # as the speedrun does: found and passed
    md = path.read_text()
    assert md.count("| grpo | arith |") == 1, "an eval file in the run directory is listed once, under its stage"
    images = _check_images(md, run)
    assert set(images) == {"grpo_throughput.png", "grpo_experts.png", "grpo_rl.png"}
    assert "Reinforcement learning (start -> end)" in md
    ev = _row(md, "grpo | arith")
    assert ev[3:] == ["200", "0.4100", "0.7700 (k=8)", "0.5500 (k=8)"]
    # a GPU run: real dollars at the receipt's price
    assert _row(md, "grpo")[4] == cost_tables.usd(600 / 3600 * 2.5)


def _smoke_hf():
    from nanoseek.config import preset

    return preset("smoke").to_hf_dict()


# ---------------------------------------------------------------------------------------------- stages sum
def test_multiple_runs_sum_like_deepseeks_table(pretrain_run, tmp_path, capsys):
    grpo = tmp_path / "grpo"
    fake_grpo_run(grpo, _smoke_hf())
    loose = tmp_path / "scores.json"  # an eval passed by hand, tolerant of a different shape and missing keys
    loose.write_text(json.dumps({"results": [{"task": "countdown", "pass@1": 0.2}, {"accuracy": 0.3}]}))
    out = tmp_path / "card"
    assert main(["report", str(pretrain_run), str(grpo), "--out", str(out), "--eval", str(loose), "--mfu", "0.5"]) == 0
    assert str(out / "report.md") in capsys.readouterr().out
    md = (out / "report.md").read_text()
    receipts = [cost.read_receipt(p / "receipt.json") for p in (pretrain_run, grpo)]
    rows = cost.summarize(receipts, "h100", 0.5)
    assert "H100-hours at 50% MFU" in md
    total = _row(md, "**Total**")
    assert total[5] == cost_tables.si(sum(r.tokens for r in receipts))
    assert total[3] == "**" + _cell_hours(rows[-1]["device_hours"]) + "**"
    assert total[8] == "**" + _cell_usd(rows[-1]["projected_dollars"]) + "**"
    assert math.isclose(rows[-1]["projected_hours"], sum(r["projected_hours"] for r in rows[:-1]))
    assert "| - | countdown | scores.json | - | 0.2000 | - | - |" in md
    assert "| - | - | scores.json | - | 0.3000 | - | - |" in md
    images = _check_images(md, out)
    assert {"pretrain_loss.png", "grpo_rl.png"} <= set(images)
    assert "grpo_loss.png" not in images  # an RL stage's policy loss is no cross-entropy: its curves are in _rl


def _cell_hours(h):
    from nanoseek.report import _hours_cell

    return _hours_cell(h)


def _cell_usd(x):
    from nanoseek.report import _usd_cell

    return _usd_cell(x)


def test_eval_files_are_read_tolerantly(tmp_path):
    f = tmp_path / "e.json"
    f.write_text(json.dumps({"gsm8k": {"pass@1": 0.5, "pass@4": 0.7, "pass@16": 0.9, "maj@16": 0.6, "num": 50}}))
    (row,) = read_eval(f)
    assert (row["task"], row["num"], row["pass@1"], row["pass@k"], row["maj@k"]) == ("gsm8k", 50, 0.5, (16, 0.9),
                                                                                    (16, 0.6))
    f.write_text(json.dumps({"task": "x"}))
    with pytest.raises(ValueError, match="no pass@k"):
        read_eval(f)


# ---------------------------------------------------------------------------------------------- bad inputs
def _fails(capsys, argv, *needles):
    assert main(["report", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nanoseek report: error:") and "\n" not in err, err
    for n in needles:
        assert n in err, err


def test_bad_inputs_are_one_clear_line(pretrain_run, tmp_path, capsys):
    _fails(capsys, [str(tmp_path / "nope")], "does not exist")
    (tmp_path / "file.txt").write_text("x")
    _fails(capsys, [str(tmp_path / "file.txt")], "not a run directory")
    (tmp_path / "empty").mkdir()
    _fails(capsys, [str(tmp_path / "empty")], "not a run directory")
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text(json.dumps({"stage": "sft"}))
    _fails(capsys, [str(half)], "no metrics.jsonl")
    (half / "metrics.jsonl").write_text("\n{not json\n")
    _fails(capsys, [str(half)], "holds no metrics")
    (half / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    (half / "receipt.json").write_text("{\"stage\": ")
    _fails(capsys, [str(half)], "corrupt receipt", "receipt.json")
    (half / "receipt.json").write_text(json.dumps({"stage": "sft"}))
    _fails(capsys, [str(half)], "corrupt receipt", "missing")
    _fails(capsys, [str(pretrain_run), "--out", str(tmp_path / "o"), "--mfu", "40"], "0.4")
    _fails(capsys, [str(pretrain_run), "--out", str(tmp_path / "o"), "--project-to", "abacus"], "abacus")
    _fails(capsys, [str(pretrain_run), "--out", str(tmp_path / "o"), "--eval", str(tmp_path / "x.json")], "x.json")


def test_unfinished_run_is_reported_without_its_cost(tmp_path):
    run = tmp_path / "sft"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"stage": "sft", "model": _smoke_hf()}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"stage": "sft", "step": i, "loss": 3.0 / i}) + "\n"
                                               for i in range(1, 6)) + '{"stage": "sft", "st')  # cut mid-line
    md = write_report([run, run], tmp_path / "out").read_text()
    assert "nothing to cost" in md and "no receipt.json" in md and "1 unreadable line" in md
    assert _images(md) == ["sft_loss.png", "sft-2_loss.png"]  # the same stage twice: distinct labels and plots
