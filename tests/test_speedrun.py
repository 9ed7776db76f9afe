"""`nanoseek speedrun --preset smoke`: every stage end to end, its outputs, resuming, bad budgets."""

import json
import re
import time

import pytest
import torch
from transformers import DeepseekV3ForCausalLM as HFDeepseekV3

from nanoseek.checkpoint import load_model
from nanoseek.cli import main
from nanoseek.speedrun import STAGE_SHARES, Clock, Plan, edge_of_competence, make_plan, write_sft_data
from nanoseek.train.pretrain import cpu_workers


@pytest.fixture(scope="module")
def speedrun(tmp_path_factory):
    root = tmp_path_factory.mktemp("speedrun") / "sr"
    # two workers: pretraining runs as two single-threaded torch.distributed ranks, as on a multi-core CPU
    assert main(["speedrun", "--preset", "smoke", "--run", str(root), "--workers", "2"]) == 0
    return root


def test_smoke_speedrun_writes_report_receipt_and_a_transformers_model(speedrun):
    receipt = json.loads((speedrun / "receipt.json").read_text())
    assert set(receipt["accuracy"]) == {"pretrain", "sft", "grpo"}
    assert receipt["device_hours"] > 0 and receipt["stages"][-1]["stage"] == "Total"
    assert json.loads((speedrun / "pretrain" / "receipt.json").read_text())["num_devices"] == 2  # both ranks
    assert receipt["stages"][-1]["projected_hours"] > 0  # the same work on one H100
    report = (speedrun / "report.md").read_text()
    assert "Total" in report and "H100" in report and "pass@1" in report
    assert "unknown model" not in report  # SFT and GRPO runs: read from their model/config.json
    for stage in ("pretrain", "sft", "grpo"):
        assert (speedrun / stage / "receipt.json").exists() and (speedrun / stage / "eval.json").exists()
    hf = HFDeepseekV3.from_pretrained(speedrun / "grpo" / "model", dtype=torch.float32).eval()
    ours = load_model(speedrun / "grpo" / "model")
    ids = torch.randint(0, ours.config.vocab_size, (1, 24))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max() < 1e-4


def test_rerunning_skips_finished_stages(speedrun, capsys):
    before = {s: (speedrun / s / "receipt.json").read_text() for s in ("pretrain", "sft", "grpo")}
    t0 = time.perf_counter()
    assert main(["speedrun", "--preset", "smoke", "--run", str(speedrun)]) == 0
    assert time.perf_counter() - t0 < 60  # nothing is retrained
    assert {s: (speedrun / s / "receipt.json").read_text() for s in before} == before
    assert "stage 1/3" not in capsys.readouterr().out


def test_another_preset_cannot_resume_this_speedrun(speedrun, capsys):
    assert main(["speedrun", "--preset", "tiny", "--run", str(speedrun)]) == 2
    assert "holds a speedrun of preset 'smoke'" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--minutes", "-1"], "--minutes must be positive"),
    (["--minutes", "5", "--budget-usd", "1"], "not both"),
    (["--budget-usd", "0"], "--budget-usd must be positive"),
    (["--budget-usd", "1", "--device", "cpu"], "no price per hour"),
    (["--device", "tpu9"], "unknown device"),
    (["--workers", "0"], "--workers must be >= 1"),
])
def test_bad_budgets_are_one_clear_line(tmp_path, capsys, args, message):
    assert main(["speedrun", *args, "--run", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_a_file_where_a_run_directory_belongs_is_one_line(tmp_path, capsys):
    (tmp_path / "sr").mkdir()
    (tmp_path / "sr" / "pretrain").write_text("not a run")
    assert main(["speedrun", "--preset", "smoke", "--workers", "2", "--run", str(tmp_path / "sr")]) == 2
    err = capsys.readouterr().err.strip()
    assert "pretrain is a file" in err and len(err.splitlines()) == 1


def test_budget_plans():
    plan = make_plan(budget_usd=6.0, device="h100")  # $6 at $3/hour = 2 hours
    assert plan.minutes == pytest.approx(120.0) and plan.preset == "d12"
    assert make_plan(minutes=30, device="cpu").preset == "tiny"
    assert make_plan(minutes=30, device="cpu").workers == cpu_workers() >= 1  # one process per core
    assert make_plan(preset="smoke", device="cpu").workers == 1 and make_plan(device="h100").workers == 1
    # the probe asks only for levels the task has: countdown starts at two numbers
    assert make_plan(task="countdown", device="cpu").probe_difficulties == (2, 3, 4, 5)
    assert make_plan(task="arithmetic", preset="smoke", device="cpu").probe_difficulties == (1, 2)
    assert Plan(preset="tiny", minutes=30).probe_difficulties == (2, 3, 4, 5)  # the default task, countdown
    clock = Clock(30.0, spent_minutes=10.0)
    assert clock.left() == pytest.approx(20.0, abs=0.01)
    # what is left after the reserve is shared by the remaining stages' weights
    sft, grpo = STAGE_SHARES["sft"], STAGE_SHARES["grpo"]
    assert clock.share("sft", ["sft", "grpo"], reserve=4.0) == pytest.approx(16.0 * sft / (sft + grpo), abs=0.01)


def test_the_edge_of_competence_is_the_easiest_level_not_yet_learnt():
    assert edge_of_competence({"1": 1.0, "2": 0.04, "3": 0.0}) == 2  # not 1, where RL has nothing to add
    assert edge_of_competence({"1": 0.8, "2": 0.3}) == 1
    assert edge_of_competence({"2": 0.95, "1": 0.92}) == 2  # all learnt: the hardest


def test_sft_data_sits_at_the_edge_and_below_never_above(tmp_path):
    def prompts(task, num):
        lines = write_sft_data(tmp_path / task, task, 2, num).read_text().splitlines()
        return [json.loads(line)["messages"][0]["content"] for line in lines]

    countdown = prompts("countdown", 60)
    assert len(countdown) == 60  # countdown has no level 1, so every problem has exactly two numbers
    assert all(len(re.search(r"\[(.*?)\]", p).group(1).split(",")) == 2 for p in countdown)
    longest = [max(len(n) for n in re.findall(r"\d+", p.split("Compute")[1])) for p in prompts("arithmetic", 200)]
    assert set(longest) == {1, 2}  # the edge (2 digits) and the level below it, not 3
