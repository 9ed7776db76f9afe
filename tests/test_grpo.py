"""GRPO: the loss of every variant against hand arithmetic, advantages, overlong penalty, dynamic sampling,
reward callables, `nanoseek grpo` end to end, and bad inputs as one-line errors."""

import json
import math
import textwrap

import pytest
import torch

from nanoseek.cli import main
from nanoseek.train.grpo import (GRPOConfig, RolloutBatches, group_advantages, grpo_loss, load_reward_fn,
                                 overlong_penalty, select_groups)
from conftest import routing_biases


# ---------------------------------------------------------------------------------------------- the loss by hand
# Two prompts x two completions, up to three tokens each. Row 3 has one token, row 1 two, rows 0 and 2 three.
NEW = [[-1.0, -0.5, -2.0], [-0.2, -1.5, 0.0], [-0.7, -0.3, -1.1], [-2.5, 0.0, 0.0]]
OLD = [[-1.2, -0.5, -1.0], [-0.2, -1.0, 0.0], [-0.4, -0.8, -1.1], [-2.0, 0.0, 0.0]]
REF = [[-1.1, -0.9, -1.5], [-0.6, -1.2, 0.0], [-0.7, -0.5, -0.9], [-2.2, 0.0, 0.0]]
MASK = [[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]]
ADV = [1.0, -1.0, 0.5, -0.5]


def hand_token(lp, old, ref, a, eps_lo, eps_hi, beta):
    """-min(r A, clip(r) A) + beta k3, one token, in plain Python."""
    r = math.exp(lp - old)
    clipped = min(max(r, 1 - eps_lo), 1 + eps_hi)
    loss = -min(r * a, clipped * a)
    if beta:
        d = ref - lp
        loss += beta * (math.exp(d) - d - 1)
    return loss


def hand_loss(kind, eps_lo=0.2, eps_hi=0.2, beta=0.0, max_len=4):
    per = [[hand_token(NEW[i][t], OLD[i][t], REF[i][t], ADV[i], eps_lo, eps_hi, beta) if MASK[i][t] else 0.0
            for t in range(3)] for i in range(4)]
    lens = [sum(m) for m in MASK]
    if kind == "grpo":
        return sum(sum(per[i]) / lens[i] for i in range(4)) / 4
    if kind in ("dapo", "bnpo"):
        return sum(map(sum, per)) / sum(lens)
    return sum(map(sum, per)) / (4 * max_len)  # dr_grpo


def loss_of(kind, **kw):
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    loss, stats = grpo_loss(t(NEW), t(OLD), t(REF), t(ADV), t(MASK), loss_type=kind, max_completion_length=4, **kw)
    return float(loss), stats


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "dapo", "bnpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("eps_hi", [None, 0.28])
def test_loss_equals_hand_arithmetic_for_every_variant(kind, beta, eps_hi):
    got, _ = loss_of(kind, epsilon=0.2, epsilon_high=eps_hi, beta=beta)
    want = hand_loss(kind, 0.2, 0.2 if eps_hi is None else eps_hi, beta)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_clip_higher_and_k3_on_single_tokens_written_out():
    # ratio e^0.5 = 1.6487 > 1.28: a positive advantage is capped at 1.28, a negative one is not (min takes it)
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    pos, _ = grpo_loss(t([[0.5]]), t([[0.0]]), None, t([1.0]), t([[1.0]]), epsilon=0.2, epsilon_high=0.28)
    neg, stats = grpo_loss(t([[0.5]]), t([[0.0]]), None, t([-1.0]), t([[1.0]]), epsilon=0.2, epsilon_high=0.28)
    assert float(pos) == pytest.approx(-1.28)
    assert float(neg) == pytest.approx(1.6487212707, rel=1e-9)
    assert stats["clip_fraction"] == 0.0  # the negative-advantage token is not clipped
    # ratio e^-0.5 = 0.6065 < 0.8 with A = -1: clipped at 0.8 -> loss -(-0.8) ... min(-0.6065, -0.8) = -0.8
    low, stats = grpo_loss(t([[-0.5]]), t([[0.0]]), None, t([-1.0]), t([[1.0]]), epsilon=0.2)
    assert float(low) == pytest.approx(0.8) and stats["clip_fraction_low"] == 1.0
    # k3 with ref - logp = 0.3: e^0.3 - 0.3 - 1 = 0.0498588; ratio 1 and A = 0 leave only beta * k3
    kl, stats = grpo_loss(t([[-1.0]]), None, t([[-0.7]]), t([0.0]), t([[1.0]]), beta=0.5)
    assert float(kl) == pytest.approx(0.5 * 0.04985880757600, rel=1e-9)
    assert stats["kl"] == pytest.approx(0.04985880757600, rel=1e-9)


def test_one_pass_has_ratio_one_so_the_loss_is_minus_the_mean_advantage():
    logps = torch.tensor(NEW, dtype=torch.float64, requires_grad=True)
    loss, _ = grpo_loss(logps, None, None, torch.tensor(ADV, dtype=torch.float64),
                        torch.tensor(MASK, dtype=torch.float64), loss_type="grpo")
    assert float(loss.detach()) == pytest.approx(-sum(ADV) / 4)
    loss.backward()  # d/dlogp of -r A at r = 1 is -A / len / N on each real token, 0 on padding
    assert float(logps.grad[1, 2]) == 0.0
    assert float(logps.grad[1, 0]) == pytest.approx(1.0 / 2 / 4)


def test_micro_batches_with_global_normalisers_average_to_the_full_batch_loss():
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    for kind in ("grpo", "dapo", "dr_grpo"):
        full, _ = loss_of(kind, beta=0.04)
        halves = [grpo_loss(t(NEW[a:b]), t(OLD[a:b]), t(REF[a:b]), t(ADV[a:b]), t(MASK[a:b]), loss_type=kind,
                            beta=0.04, max_completion_length=4, num_sequences=4 / 2,
                            num_tokens=sum(map(sum, MASK)) / 2)[0] for a, b in ((0, 2), (2, 4))]
        assert float(sum(halves) / 2) == pytest.approx(full, rel=1e-12), kind


def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    g = group_advantages(r, "group")
    s = math.sqrt(0.5)  # unbiased std of {1, 0}
    assert g[0].tolist() == pytest.approx([0.5 / (s + 1e-4), -0.5 / (s + 1e-4)])
    assert g[1].tolist() == [0.0, 0.0]  # a uniform group carries no signal
    assert group_advantages(r, "none")[0].tolist() == [0.5, -0.5]  # Dr. GRPO: no std
    # batch: std over all four rewards {1,0,1,1}: mean 0.75, sum of squares 0.75, /3 -> std 0.5
    assert group_advantages(r, "batch")[0].tolist() == pytest.approx([0.5 / 0.5001, -0.5 / 0.5001])


def test_overlong_penalty_is_dapos_linear_ramp():
    assert overlong_penalty(80, 100, 20) == 0.0
    assert overlong_penalty(90, 100, 20) == pytest.approx(-0.5)
    assert overlong_penalty(100, 100, 20) == pytest.approx(-1.0)
    assert overlong_penalty(100, 100, 0) == 0.0


def test_select_groups_drops_uniform_groups():
    assert select_groups([[1, 1, 1], [0, 1, 0], [0.1, 0.1, 0.1], [1, 0, 0]], 5) == [1, 3]
    assert select_groups([[0, 1], [1, 0], [0, 1]], 2) == [0, 1]


# ---------------------------------------------------------------------------------------------- rollouts
@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    """A reward callable: prompts whose first operand is even get all-equal rewards, odd ones vary by sample."""
    (tmp_path / "issue5_rewards.py").write_text(textwrap.dedent("""
        def parity(prompts, completions, problem, sample, **columns):
            return [1.0 if p["data"]["a"] % 2 == 0 else float(s % 2) for p, s in zip(problem, sample)]

        def wrong_length(prompts, completions, **columns):
            return [0.0]

        def even_tokens(prompts, completions, completion_ids, **columns):
            return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "issue5_rewards"


def _batches(smoke_model, **kw):
    from nanoseek.checkpoint import load_model
    from nanoseek.tokenizer import Tokenizer

    kw = {"task": "arithmetic", "difficulty": "2", "group_size": 2, "prompts_per_step": 3, "max_new_tokens": 4,
          "max_batch": 16, **kw}
    cfg = GRPOConfig(**kw).validate()
    model = load_model(smoke_model / "model", dtype=torch.float32)
    fn = load_reward_fn(cfg.reward) if cfg.reward else None
    return RolloutBatches(model, Tokenizer.load(smoke_model / "model"), cfg, num_chunks=2, reward_fn=fn)


def test_dynamic_sampling_drops_uniform_groups_and_refills(smoke_model, reward_module):
    b = _batches(smoke_model, reward=f"{reward_module}:parity", dynamic_sampling=True, max_sampling_rounds=6)
    chunks = b.make_rollout()
    adv = torch.cat([c.advantages for c in chunks]).view(3, 2)
    assert (adv.abs().sum(dim=1) > 0).all()  # every kept group carries signal
    m = chunks[0].metrics
    assert m["frac_reward_zero_std"] > 0 and m["sampling_rounds"] >= 2 and b.counter > 3  # refilled
    # without dynamic sampling the uniform groups stay (zero advantage)
    b = _batches(smoke_model, reward=f"{reward_module}:parity")
    adv = torch.cat([c.advantages for c in b.make_rollout()]).view(3, 2)
    assert (adv.abs().sum(dim=1) == 0).any() and b.counter == 3


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_micro_batches_share_prompts_are_trimmed_and_give_the_whole_batch_gradient(smoke_model, reward_module,
                                                                                    loss_type):
    """A micro-batch holds each distinct prompt once and its completions sorted and padded only to their own
    longest; the micro-batches' gradients add up to the gradient of one plain causal forward over every
    prompt + completion (so sharing, sorting and trimming change speed, not the update)."""
    from nanoseek.train.grpo import make_loss_fn

    import dataclasses

    b = _batches(smoke_model, max_new_tokens=8, loss_type=loss_type, group_size=4, prompts_per_step=2)
    prompts, columns, outputs = b.sample_groups(2)
    cut = [3, 8, 1, 5, 6, 2, 7, 4]  # completions of mixed lengths (this model rarely ends one by itself)
    outputs = [[dataclasses.replace(o, token_ids=o.token_ids[:cut[4 * g + i]]) for i, o in enumerate(group)]
               for g, group in enumerate(outputs)]
    rewards = [[float(len(o.token_ids) % 2) for o in group] for group in outputs]  # mixed in both groups
    chunks = b._tensorize([(p, c, o, r) for p, c, o, r in zip(prompts, columns, outputs, rewards)])
    lengths = [c.mask.sum(1).long().tolist() for c in chunks]  # overlong "none": every completion token trains
    assert lengths == [[1, 2, 3, 4], [5, 6, 7, 8]]  # sorted by length across micro-batches
    assert all(c.completion_ids.shape[1] == max(n) for c, n in zip(chunks, lengths))  # trimmed to its own longest
    for c in chunks:  # 4 completions of at most 2 prompts: each prompt once, and every one used
        assert sorted(set(c.prompt_index.tolist())) == list(range(len(c.prompt_ids))) and len(c.prompt_ids) <= 2

    model, params = b.model, list(b.model.parameters())
    fn = make_loss_fn(b.cfg)
    model.zero_grad()
    for c in chunks:
        (fn(model, c)[0] / len(chunks)).backward()  # what the loop does with grad_accum micro-batches
    chunked = [p.grad.clone() for p in params if p.grad is not None]

    # the definition: each prompt + completion as one right-padded row of one plain forward
    rows, starts = [], []
    for c in chunks:
        for j, i in enumerate(c.prompt_index.tolist()):
            prompt = c.prompt_ids[i, :c.prompt_lengths[i]]
            rows.append(torch.cat((prompt, c.completion_ids[j])))
            starts.append(len(prompt))
    Lc = max(c.completion_ids.shape[1] for c in chunks)
    ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=b.tok.pad_id)
    ids = _pad_right(ids, max(starts) + Lc, b.tok.pad_id)
    take = torch.tensor(starts)[:, None] + torch.arange(Lc)  # completion positions, row by row
    mask = torch.cat([_pad_right(c.mask, Lc, 0) for c in chunks])
    adv = torch.cat([c.advantages for c in chunks])
    model.zero_grad()
    logp = torch.log_softmax(model(ids).float() / b.cfg.temperature, dim=-1)
    logps = logp[torch.arange(len(rows))[:, None], take - 1].gather(2, ids.gather(1, take)[..., None]).squeeze(2)
    grpo_loss(logps, None, None, adv, mask, loss_type=loss_type)[0].backward()
    whole = [p.grad.clone() for p in params if p.grad is not None]
    assert len(whole) == len(chunked) and any(g.abs().sum() > 0 for g in whole)
    for g1, g2 in zip(chunked, whole):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


def _pad_right(x: torch.Tensor, width: int, value) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


def test_reward_callables_load_and_are_checked(smoke_model, reward_module):
    assert callable(load_reward_fn(f"{reward_module}:parity"))
    for bad, msg in [("nocolon", "module:function"), ("no_such_mod_x:f", "cannot import"),
                     (f"{reward_module}:missing", "no function")]:
        with pytest.raises(ValueError, match=msg):
            load_reward_fn(bad)
    b = _batches(smoke_model, reward=f"{reward_module}:wrong_length")
    with pytest.raises(ValueError, match="one float per completion"):
        b.make_rollout()


def test_later_passes_reuse_the_rollout_and_its_old_logprobs(smoke_model):
    from nanoseek.train.grpo import make_loss_fn

    b = _batches(smoke_model, num_iterations=2)
    fn = make_loss_fn(b.cfg)
    first = [next(b) for _ in range(2)]
    for mb in first:
        fn(b.model, mb)
    second = [next(b) for _ in range(2)]
    assert [id(x) for x in second] == [id(x) for x in first] and second[0].old_logps is not None
    assert second[0].metrics["rollout_seconds"] == 0.0
    assert next(b) is not first[0]  # third pass: a new rollout


# ---------------------------------------------------------------------------------------------- the command
def test_nanoseek_grpo_runs_two_steps_and_logs_the_metrics(smoke_model, tmp_path):
    run = tmp_path / "grpo"
    assert main(["grpo", "--init", str(smoke_model), "--run", str(run), "--task", "arithmetic", "--difficulty", "1",
                 "--group-size", "2", "--prompts-per-step", "2", "--max-new-tokens", "6", "--steps", "2",
                 "--beta", "0.04", "--num-iterations", "2", "--epsilon-high", "0.28", "--eval-num", "2",
                 "--batch-size", "2", "--overlong", "penalty"]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and "eval_accuracy" in rows[0]  # the before-training point
    last = rows[-1]
    for key in ("loss", "reward", "reward_std", "accuracy", "format_rate", "response_length", "clipped_ratio",
                "frac_reward_zero_std", "kl", "clip_fraction", "entropy", "rollout_seconds", "update_seconds",
                "eval_accuracy"):
        assert key in last, key
    assert (run / "model" / "tokenizer.json").exists() and (run / "receipt.json").exists()
    assert json.loads((run / "receipt.json").read_text())["stage"] == "grpo"
    before, after = routing_biases(smoke_model / "model"), routing_biases(run / "model")
    assert before and all(torch.equal(before[k], after[k]) for k in before)  # the routing bias stays frozen


def test_rl_climbs_a_reward_whose_optimum_is_known(smoke_model, reward_module, tmp_path):
    """End to end, sampling -> advantages -> loss -> optimizer: rewarded for the share of even token ids in its
    completions (about half for an untrained model, 1.0 at the optimum), the policy must move towards it."""
    run = tmp_path / "toy"
    assert main(["grpo", "--init", str(smoke_model), "--run", str(run), "--task", "arithmetic", "--difficulty", "1",
                 "--reward", f"{reward_module}:even_tokens", "--group-size", "8", "--prompts-per-step", "4",
                 "--max-new-tokens", "8", "--steps", "16", "--lr", "1e-2", "--eval-num", "0",
                 "--batch-size", "32"]) == 0
    rewards = [r["reward"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "reward" in r]
    assert len(rewards) == 16
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert first < 0.75 and last > first + 0.2, rewards


@pytest.mark.parametrize("extra, message", [
    (["--task", "nope"], "unknown task"),
    (["--task", "arithmetic", "--group-size", "1"], "--group-size must be >= 2"),
    (["--task", "arithmetic", "--loss-type", "ppo"], "--loss-type 'ppo' is unknown"),
    (["--task", "arithmetic", "--overlong", "cut"], "--overlong 'cut' is unknown"),
    (["--task", "arithmetic", "--max-batch", "0"], "--max-batch must be >= 1"),
    (["--data", "MALFORMED"], "line 2 is not valid JSON"),
])
def test_bad_inputs_are_one_line(smoke_model, tmp_path, capsys, extra, message):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "hi", "answer": "1"}\n{oops\n')
    extra = [str(bad) if x == "MALFORMED" else x for x in extra]
    assert main(["grpo", "--init", str(smoke_model), "--run", str(tmp_path / "r"), "--steps", "1", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r" / "config.json").exists()


def test_missing_init_is_one_line(tmp_path, capsys):
    assert main(["grpo", "--init", str(tmp_path / "none"), "--run", str(tmp_path / "r"), "--task", "arithmetic",
                 "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and len(err.splitlines()) == 1
