"""Draft tuning: only the MTP modules train, on the model's own answers; the output stays the same and more drafts
pass; bad input is one line."""

import json

import pytest
import torch

from nanoseek.checkpoint import load_model
from nanoseek.cli import main
from nanoseek.infer.engine import Output
from nanoseek.train.draft_tune import draft_loss, examples, freeze_all_but_mtp, one_per_row
from nanoseek.train.sft import inputs_targets

FAST = ["--num-prompts", "16", "--eval-prompts", "4", "--max-tokens", "24", "--batch-size", "4", "--seq-len", "128"]


def test_the_loss_is_on_the_answers_and_reaches_only_the_mtp_modules(smoke_model):
    model = load_model(smoke_model / "model")
    out = Output("0", [1, 5, 6], [7, 8, 9, 2], "", "", "", "stop")
    ids, mask = examples([out])[0]
    assert ids == [1, 5, 6, 7, 8, 9, 2] and mask == [0, 0, 0, 1, 1, 1, 1]
    short = ([1, 5, 7, 2], [0, 0, 1, 1])
    rows, masks, cut = one_per_row([(ids, mask), short, (ids, mask)], 16, 0)  # each answer alone after its prompt
    assert rows.shape == (3, 7) and rows[1].tolist() == [1, 5, 7, 2, 0, 0, 0] and cut == 0
    assert one_per_row([(ids, mask)], 4, 0)[2] == 1  # longer than seq_len + 1: cut, and counted
    inputs, targets = inputs_targets(rows, masks)
    assert targets[0].tolist() == [-100, -100, 7, 8, 9, 2] and targets[1].tolist() == [-100, 7, 2, -100, -100, -100]
    assert freeze_all_but_mtp(model) == sum(p.numel() for m in model.mtp_modules for p in m.parameters())
    loss, metrics, _ = draft_loss(model.train(), (inputs, targets))
    loss.backward()
    mtp = {id(p) for m in model.mtp_modules for p in m.parameters()}
    assert all((p.grad is not None) == (id(p) in mtp) for p in model.parameters())
    assert 0.0 <= float(metrics["draft_1_top1"]) <= 1.0 and metrics["trained_tokens"] == 2 * 4 + 2


def test_soft_targets_are_the_main_models_distribution_at_the_drafted_position(smoke_model):
    """Module k at position i drafts token i+k+2, which the main model predicts at position i+k+1: a chain whose
    logits are exactly the main model's there scores the main model's entropy (the minimum); shifted by one
    position, it scores more."""
    model = load_model(smoke_model / "model").eval()
    inputs = torch.randint(0, model.config.vocab_size, (2, 12))
    targets = torch.roll(inputs, -1, dims=1)
    targets[:, :3] = -100
    with torch.no_grad():
        main = model(inputs).float()
    D, seen = len(model.mtp_modules), targets != -100
    entropy = [-(main.softmax(-1) * main.log_softmax(-1)).sum(-1)[:, k + 1:][seen[:, k + 1:]].mean() for k in range(D)]
    for shift, lowest in ((0, True), (1, False)):
        model.mtp_logits = lambda h, ids: [main.roll(-shift, dims=1)[:, k + 1:] for k in range(D)]
        loss, _, _ = draft_loss(model, (inputs, targets), soft=True)
        assert torch.isclose(loss, torch.stack(entropy).mean(), atol=1e-5) == lowest
        assert lowest or loss > torch.stack(entropy).mean()


def test_draft_tune_end_to_end_keeps_the_model_and_raises_acceptance(smoke_model, tmp_path):
    run = tmp_path / "drafts"
    assert main(["draft-tune", "--init", str(smoke_model), "--run", str(run), "--steps", "20", "--lr", "3e-3",
                 *FAST]) == 0
    before, after = load_model(smoke_model / "model").state_dict(), load_model(run / "model").state_dict()
    L = load_model(run / "model").config.num_hidden_layers
    mtp = [k for k in before if k.startswith(f"model.layers.{L}.")]
    assert mtp and any(not torch.equal(before[k], after[k]) for k in mtp)
    assert all(torch.equal(before[k], after[k]) for k in before if k not in mtp)  # main model, head, routing bias
    result = json.loads((run / "acceptance.json").read_text())
    assert result["same_output"] and result["held_out_prompts"] == 4 and result["answers_trained"] == 16
    assert result["acceptance_after"] > result["acceptance_before"] + 0.2
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["stage"] == "draft-tune" and rows[-1]["draft_1_top1"] > rows[0]["draft_1_top1"]
    assert "val_draft_1_top1" in rows[-1] and (run / "receipt.json").exists()
    assert len((run / "answers.jsonl").read_text().splitlines()) == 16
    # a longer run resumes from the checkpoint, on the answers already generated
    assert main(["draft-tune", "--init", str(smoke_model), "--run", str(run), "--steps", "22", "--lr", "3e-3",
                 "--resume", *FAST]) == 0
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 22


def test_draft_tune_on_a_prompts_file_holds_out_its_last_tenth(smoke_model, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"Compute {i} + {i}.\n" for i in range(20)))
    run = tmp_path / "drafts"
    # the default --seq-len (512) is past this model's context (256): as a cap on a row it just stops there
    assert main(["draft-tune", "--init", str(smoke_model), "--run", str(run), "--prompts", str(prompts), "--chat",
                 "--soft-targets", "--steps", "1", "--max-tokens", "24", "--eval-prompts", "4"]) == 0
    result = json.loads((run / "acceptance.json").read_text())
    assert result["held_out_prompts"] == 2 and result["answers_trained"] == 18 and result["same_output"]
    assert json.loads((run / "config.json").read_text())["soft"] is True


@pytest.mark.parametrize("extra, message", [
    (["--num-prompts", "0"], "must be >= 1"),
    (["--prompts", "missing.txt"], "does not exist"),
    (["--prompts", "FEW"], "too few: give at least 10"),
    (["--task", "chess"], "unknown task 'chess'"),
    (["--set", "hidden_size=64"], "only training fields"),
])
def test_bad_draft_tune_input_is_one_line(smoke_model, tmp_path, capsys, extra, message):
    if "FEW" in extra:
        (tmp_path / "few.txt").write_text("one\ntwo\n")
        extra = ["--prompts", str(tmp_path / "few.txt")]
    assert main(["draft-tune", "--init", str(smoke_model), "--run", str(tmp_path / "r"), "--steps", "1",
                 *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_model_without_mtp_modules_is_one_line(tmp_path, capsys):
    run = tmp_path / "nomtp"
    assert main(["pretrain", "--preset", "smoke", "--data", "builtin:100", "--batch-size", "2", "--seq-len", "32",
                 "--steps", "1", "--run", str(run), "--set", "num_nextn_predict_layers=0"]) == 0
    capsys.readouterr()
    assert main(["draft-tune", "--init", str(run), "--run", str(tmp_path / "r"), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no MTP modules" in err and len(err.splitlines()) == 1
