"""The inference engine: greedy == full-forward reference (batched, continuous, speculative), exact speculative
sampling, seeds, stops, logprobs, thinking budgets, reasoning split, bad inputs and the two commands."""

import io
import itertools
import json
import random
import sys
from collections import Counter

import pytest
import torch

import nanoseek
from nanoseek.checkpoint import save_model
from nanoseek.config import smoke
from nanoseek.infer.cache import LatentCache
from nanoseek.infer.engine import Engine, Request
from nanoseek.infer.reasoning import split_reasoning
from nanoseek.infer.sampling import SamplingParams, sample, speculative_accept
from nanoseek.model.transformer import DeepseekV3ForCausalLM
from nanoseek.tokenizer import Tokenizer

CORPUS = ["What is 12+30? <think>Let me add 12 and 30. Wait, 2 plus 0 is 2.</think><answer>42</answer>"] * 40 + \
         ["hello world, the quick brown fox jumps over the lazy dog"] * 40


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Models this small decode fastest on one thread; on a shared, busy CPU extra threads mostly wait for each other.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(CORPUS, 400)


def _model(vocab_size: int = 512, seed: int = 0, mtp: int = 1) -> DeepseekV3ForCausalLM:
    torch.manual_seed(seed)
    return DeepseekV3ForCausalLM(smoke().replace(vocab_size=vocab_size, num_nextn_predict_layers=mtp)).eval()


def _rigged(attn_scale: float = 1.0, vocab_size: int = 512, mtp: int = 1) -> DeepseekV3ForCausalLM:
    """A model whose MTP modules nearly agree with it, so drafts are often (not always) accepted.

    With every FFN output zeroed, the main model's hidden state is norm(emb(t) + attention), so its next token is
    mostly a function of the current token. Each MTP module, with eh_proj passing only the embedding through and
    its own attention and FFN zeroed, computes the same function of the token it is given: its draft matches
    unless the main model's attention (scaled by `attn_scale`) changed its mind. In a chain of modules, module m
    is given d_m and so proposes what the model would say after d_m.
    """
    m = _model(vocab_size, mtp=mtp)
    D = m.config.hidden_size
    with torch.no_grad():
        for layer in m.main_layers:
            layer.self_attn.o_proj.weight.mul_(attn_scale)
            mlp = layer.mlp
            if hasattr(mlp, "experts"):
                mlp.experts.down_proj.zero_()
                mlp.shared_experts.down_proj.weight.zero_()
            else:
                mlp.down_proj.weight.zero_()
        for module in m.mtp_modules:
            module.eh_proj.weight.zero_()
            module.eh_proj.weight[:, :D] = torch.eye(D)
            module.self_attn.o_proj.weight.zero_()
            module.mlp.experts.down_proj.zero_()
            module.mlp.shared_experts.down_proj.weight.zero_()
        m.lm_head.weight.mul_(20)
    return m


def _with_bias(model: DeepseekV3ForCausalLM, bias: torch.Tensor) -> DeepseekV3ForCausalLM:
    """Give the output head a bias (a test-only way to steer which tokens the model prefers)."""
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.copy_(bias)
    model.lm_head = head
    return model


@torch.no_grad()
def _reference(model, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy without a cache: re-run the whole sequence every step and take the argmax."""
    ids, out, logits = list(prompt), [], []
    for _ in range(n):
        row = model(torch.tensor([ids]))[0, -1]
        logits.append(row)
        out.append(int(row.argmax()))
        ids.append(out[-1])
    return out, logits


# ------------------------------------------------------------------------------------------ greedy == reference
# drafts per speculative step: 0 = no speculation; 2 = a chain of two MTP modules
DRAFTS = [0, 1, 2]


@pytest.mark.parametrize("drafts", DRAFTS)
def test_greedy_batch_one_equals_full_forward_reference(drafts):
    model = _model(mtp=max(drafts, 1))
    prompt = [3, 17, 99, 250, 7]
    out = Engine(model, max_batch=2).generate([prompt], max_tokens=24, temperature=0, ignore_eos=True,
                                              speculative=drafts > 0)[0]
    assert out.token_ids == _reference(model, prompt, 24)[0]
    assert out.finish_reason == "length" and out.prompt_tokens == 5
    assert (out.num_drafted > 0) == (drafts > 0)


@pytest.mark.parametrize("drafts", DRAFTS)
def test_continuous_batching_requests_joining_at_different_steps_equal_reference(drafts):
    speculative = drafts > 0
    model = _rigged(mtp=drafts) if speculative else _model()
    engine = Engine(model, max_batch=3)  # 5 requests, 3 slots: two must wait for a slot to free up
    prompts = [[5, 6, 7], list(range(10, 40)), [100], [42, 43], list(range(200, 212))]
    lengths = [12, 6, 15, 9, 10]
    outputs, ids = {}, {}
    for step in range(200):
        if step in (0, 2, 3, 7, 8):  # join between steps
            i = (0, 2, 3, 7, 8).index(step)
            ids[engine.add_request(prompts[i], max_tokens=lengths[i], temperature=0, ignore_eos=True,
                                   speculative=speculative)] = i
        for e in engine.step():
            if e.finished:
                outputs[ids[e.request_id]] = e.output
        # finished requests free their slots and the rest close ranks: decoding reads the cache as one view
        assert sorted(s.slot for s in engine.running) == list(range(len(engine.running)))
        if len(outputs) == len(prompts):
            break
    assert not engine.has_unfinished() and sorted(engine.free_slots) == [0, 1, 2]
    for i, p in enumerate(prompts):
        assert outputs[i].token_ids == _reference(model, p, lengths[i])[0], f"request {i}"
    if speculative:
        assert sum(o.num_accepted for o in outputs.values()) > 0


@pytest.mark.parametrize("drafts", DRAFTS)
def test_identical_prompts_are_prefilled_once_and_decode_as_if_alone(drafts):
    speculative = drafts > 0
    model = _rigged(mtp=drafts) if speculative else _model()
    engine = Engine(model, max_batch=8)
    rows = []  # batch size of every prefill forward of the main model
    forward = model.hidden_states

    def counting(ids, *args, **kw):
        if kw.get("prefill"):
            rows.append(ids.shape[0])
        return forward(ids, *args, **kw)

    model.hidden_states = counting
    a, b, c = [5, 6, 7], [8, 9, 10], [11, 12, 13]
    prompts = [a, b, a, a, b, c]
    greedy = engine.generate(prompts, max_tokens=10, temperature=0, ignore_eos=True, speculative=speculative)
    assert rows == [3]  # one forward, one row per distinct prompt
    for p, out in zip(prompts, greedy):
        assert out.token_ids == _reference(model, p, 10)[0]
    kw = dict(max_tokens=12, temperature=1.0, ignore_eos=True, speculative=speculative)
    group = engine.generate([a] * 4, seed=7, **kw)  # G samples of one prompt: seeds 7..10
    assert [o.token_ids for o in group] == [engine.generate([a], seed=7 + i, **kw)[0].token_ids for i in range(4)]
    assert len({tuple(o.token_ids) for o in group}) > 1


@pytest.mark.parametrize("mode", ["plain", "speculative", "speculative+logprobs", "2 drafts", "2 drafts+logprobs"])
def test_recorded_decode_steps_pad_the_batch_and_fix_the_span_without_changing_the_output(mode):
    """The CUDA-graph steps (batch padded to a bucket, padding rows in a scratch slot, a fixed span of keys), run
    unrecorded on the CPU: the same tokens as the reference while requests finish and the batch shrinks. Greedy
    speculation runs as one fused step; asking for logprobs takes the general verify + draft steps."""
    speculative, logprobs = mode != "plain", mode.endswith("logprobs")
    drafts = 2 if mode.startswith("2") else 1
    model = _rigged(mtp=drafts) if speculative else _model()
    engine = Engine(model, max_batch=6, cuda_graphs=True)  # 7 requests: one waits for a slot
    assert engine.graphs is not None and engine.cache.latent.shape[1] == 7  # + the scratch slot
    shapes, step = [], engine.graphs._step

    def recording(kind, padded, span, T):
        shapes.append((kind, padded, span))
        return step(kind, padded, span, T)

    engine.graphs._step = recording
    prompts = [list(range(10, 70)), [5, 6, 7], [100], list(range(200, 212)), [42, 43], [1, 2, 3, 4], [9]]
    lengths = [20, 12, 15, 3, 10, 7, 11]
    ids = [engine.add_request(p, max_tokens=n, temperature=0, ignore_eos=True, speculative=speculative,
                              logprobs=logprobs) for p, n in zip(prompts, lengths)]
    outs = {}
    while engine.has_unfinished():
        outs.update({e.request_id: e.output for e in engine.step() if e.finished})
    for p, n, i in zip(prompts, lengths, ids):
        assert outs[i].token_ids == _reference(model, p, n)[0]
    general = {"verify", "mtp0", "mtp1"} if drafts == 2 else {"verify", "mtp0"}
    assert {kind for kind, _, _ in shapes} == ({"decode"} if not speculative else general if logprobs
                                               else {"speculate"})
    assert {span for _, _, span in shapes} == {64, 128}  # the 60-token prompt crosses from one span to the next
    assert {padded for _, padded, _ in shapes} >= {1, 4, 6}  # 3 and 5 running rows were padded
    assert engine.cache.latent[:, 6].abs().sum() > 0  # where the padding rows wrote
    if speculative:
        assert sum(o.num_accepted for o in outs.values()) > 0


@pytest.mark.slow
def test_compiled_engine_decodes_as_the_reference():
    """`compile=True` (torch.compile on every layer) over the recorded-step path: the same greedy tokens."""
    model = _model()
    engine = Engine(model, max_batch=4, cuda_graphs=True, compile=True)
    prompts = [[3, 17, 99, 250, 7], [5, 6, 7]]
    for p, out in zip(prompts, engine.generate(prompts, max_tokens=12, temperature=0, ignore_eos=True)):
        assert out.token_ids == _reference(model, p, 12)[0]


def test_prefill_groups_prompts_of_similar_length():
    from nanoseek.infer.engine import PREFILL_FILL, PREFILL_TOKENS, _by_length, _Seq

    lengths = [3, 364, 300, 20, 290, 18, 100, 95, 2000, 9000] + [60] * 200
    seqs = [_Seq(str(i), [1] * n, SamplingParams(), False) for i, n in enumerate(lengths)]
    groups = _by_length(seqs)
    assert sorted(len(s.prompt) for g in groups for s in g) == sorted(lengths)  # every prompt, once
    for g in groups:
        longest = len(g[0].prompt)
        assert all(len(s.prompt) >= PREFILL_FILL * longest for s in g)  # padding wastes at most 1 - PREFILL_FILL
        assert len(g) == 1 or len(g) * longest <= PREFILL_TOKENS
    assert [len(s.prompt) for s in groups[0]] == [9000]  # alone: longer than a forward's budget


@torch.no_grad()
def _reference_drafts(model, seq: list[int]) -> list[int]:
    """The MTP chain without a cache, from the whole sequence: module m at position i reads (h^m_i, t_{i+m+1}),
    and the newest pair of module m (position len-2) reads the draft of module m-1."""
    ids = torch.tensor([seq])
    h, drafts = model.hidden_states(ids[:, :-1]), []
    for m in range(len(model.mtp_modules)):
        tokens = seq[m + 1:] + drafts  # t_{i+m+1} for i = 0 .. len-2
        logits, h = model.mtp_step(m, h, torch.tensor([tokens]))
        drafts.append(int(logits[0, -1].argmax()))
    return drafts


@pytest.mark.parametrize("path", ["eager", "general", "fused"])
def test_mtp_chain_drafts_equal_a_chain_over_the_whole_sequence(path):
    """After every step each row's drafts are what the MTP modules propose from the whole sequence with no cache:
    the chain kept its cache layers and hidden states right while rows emitted 1 to 4 tokens per step. A random
    model's drafts are never accepted, so the judge accepts by a seeded coin instead (the chain must follow
    whatever sequence comes out); the fused greedy step has no judge to replace, so there every step emits one
    token (`test_fused_speculative_step_keeps_the_state_the_general_step_keeps` covers more)."""
    model = _model(mtp=3)
    with torch.no_grad():  # random weights are small: make the modules' hidden input and attention count
        for module in model.mtp_modules:
            for linear in (module.eh_proj, module.self_attn.kv_b_proj, module.self_attn.o_proj):
                linear.weight.mul_(30)
    engine = Engine(model, max_batch=3, cuda_graphs=path != "eager")
    coin = random.Random(0)

    def judge(seqs, depth, logits, u):
        accept = [coin.random() < 0.7 for _ in seqs]
        drafts = [s.drafts[depth] for s in seqs]
        return [d if a else (d + 1) % 512 for d, a in zip(drafts, accept)], accept

    if path != "fused":  # (greedy rows otherwise skip the judge: their argmaxes decide)
        engine._judge, engine._greedy = judge, lambda seqs: False
    for p in ([3, 17, 99, 250, 7], [5, 6], list(range(40, 60))):
        engine.add_request(p, max_tokens=24, temperature=0, ignore_eos=True, speculative=True,
                           logprobs=path == "general")
    emitted = set()
    while engine.has_unfinished():
        for e in engine.step():
            emitted.add(len(e.token_ids))
        for s in engine.running:
            assert s.drafts == _reference_drafts(model, s.prompt + s.out)
    assert emitted == ({1} if path == "fused" else {1, 2, 3, 4})


@pytest.mark.parametrize("drafts", [1, 2])
def test_rigged_mtp_drafts_are_accepted_and_counted_consistently(drafts):
    model = _rigged(mtp=drafts)
    engine = Engine(model, max_batch=1)
    prompt = [1 + 3, 9, 27]
    rid = engine.add_request(prompt, max_tokens=40, temperature=0, ignore_eos=True, speculative=True)
    per_step = []
    while engine.has_unfinished():
        for e in engine.step():
            per_step.append(len(e.token_ids))
            out = e.output
    assert out.request_id == rid and out.token_ids == _reference(model, prompt, 40)[0]
    assert 0 < out.num_accepted < out.num_drafted  # both paths taken
    # each verify step emits 1 token plus one per accepted draft (the last step may be cut by max_tokens)
    assert per_step[0] == 1 and set(per_step[1:]) <= set(range(1, drafts + 2))
    assert 0 <= out.num_accepted - sum(n - 1 for n in per_step[1:]) <= drafts  # only the last step is cut short
    assert out.num_drafted == drafts * (len(per_step) - 1)
    assert 0 < out.acceptance_rate < 1
    if drafts == 2:
        assert max(per_step) == 3  # both drafts accepted at least once


# ------------------------------------------------------------------------------------------ speculative sampling
def test_speculative_accept_rule_gives_the_target_distribution():
    torch.manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.2, 0.1, 0.0])
    q = torch.tensor([0.1, 0.4, 0.1, 0.1, 0.3])  # very unlike p, and proposes a token p forbids
    N = 200_000
    draft = sample(q.expand(N, 5), torch.rand(N))
    accepted, token = speculative_accept(p.expand(N, 5), q.expand(N, 5), draft, torch.rand(N), torch.rand(N))
    freq = torch.bincount(token, minlength=5).float() / N
    assert (freq - p).abs().max() < 0.005
    assert freq[4] == 0
    # acceptance probability is sum_x min(p, q) = 0.1 + 0.2 + 0.1 + 0.1 + 0 = 0.5
    assert abs(accepted.float().mean().item() - 0.5) < 0.005


def test_sampling_filters_top_k_top_p_min_p():
    from nanoseek.infer.sampling import probs_from_logits

    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]] * 3))
    probs = probs_from_logits(logits, torch.ones(3), torch.tensor([1.0, 0.6, 1.0]), torch.tensor([2, 0, 0]),
                              torch.tensor([0.0, 0.0, 0.4]))
    assert torch.allclose(probs[0], torch.tensor([4 / 7, 3 / 7, 0, 0]))  # top-k 2
    assert torch.allclose(probs[1], torch.tensor([4 / 7, 3 / 7, 0, 0]))  # top-p 0.6: 0.4 + 0.3 reach it
    assert torch.allclose(probs[2], torch.tensor([4 / 9, 3 / 9, 2 / 9, 0]))  # min-p 0.4 x 0.4 = 0.16
    # no filters at all (RL rollouts) skips the sort: the same distribution as neutral filters
    logits = torch.randn(3, 50)
    t = torch.tensor([0.5, 1.0, 2.0])
    neutral = probs_from_logits(logits, t, torch.ones(3), torch.zeros(3, dtype=torch.long), torch.zeros(3))
    assert torch.allclose(probs_from_logits(logits, t), neutral, atol=1e-6)
    assert torch.allclose(neutral, (logits / t[:, None]).softmax(-1), atol=1e-6)


@pytest.mark.parametrize("drafts", [1, 2])
def test_speculative_sampling_end_to_end_matches_target_distribution(drafts):
    """The first K+2 tokens at temperature 1 (one from the prefill, then every draft judged and the free token
    after them), with and without speculation, against exact probabilities from full forwards: a chi-square
    test over all sequences of a 3-token vocabulary."""
    allowed = torch.tensor([10, 11, 12])
    bias = torch.full((512,), -1e4)
    bias[allowed] = 0.0
    model = _with_bias(_rigged(attn_scale=1.0, mtp=drafts), bias)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.1)  # soften: every sequence keeps a fair share of the mass
    prompt, n = [5, 6, 7], drafts + 2
    exact = {}
    with torch.no_grad():
        for seq in itertools.product(range(10, 13), repeat=n):
            lp = model(torch.tensor([prompt + list(seq[:-1])]))[0, -n:].log_softmax(-1)
            exact[seq] = float(sum(lp[i, t] for i, t in enumerate(seq)).exp())
    N = 500 * len(exact) // 9  # about 55 samples per sequence
    for speculative in (False, True) if drafts == 1 else (True,):
        outs = Engine(model, max_batch=128).generate([prompt] * N, max_tokens=n, temperature=1.0, seed=1,
                                                      ignore_eos=True, speculative=speculative)
        counts = Counter(tuple(o.token_ids) for o in outs)
        assert set(counts) <= set(exact)
        chi2 = sum((counts.get(k, 0) - N * p) ** 2 / (N * p) for k, p in exact.items())
        # p < 0.001 at 54 for 26 degrees of freedom, at 125 for 80
        assert chi2 < (55 if n == 3 else 125), (speculative, chi2)
        if speculative:
            drafted = sum(o.num_drafted for o in outs)
            assert 0 < sum(o.num_accepted for o in outs) < drafted


# ------------------------------------------------------------------------------------------ sampling behaviour
def test_seed_reproduces_whatever_shares_the_batch():
    engine = Engine(_model(), max_batch=4)
    kw = dict(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, min_p=0.01, repetition_penalty=1.3)
    alone = engine.generate([[1, 2, 3]], seed=7, **kw)[0].token_ids
    crowd = engine.generate([[1, 2, 3], [9, 9], [4, 5, 6, 7]], seed=7, **kw)[0].token_ids
    assert alone == crowd
    assert engine.generate([[1, 2, 3]], seed=8, **kw)[0].token_ids != alone


def test_max_tokens_stop_tokens_and_stop_strings(tok):
    model = _model(tok.vocab_size)
    engine = Engine(model, tokenizer=tok)
    full = engine.generate(["hello world"], max_tokens=20, temperature=0, ignore_eos=True)[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 20
    stop_id = full.token_ids[6]
    cut = engine.generate(["hello world"], max_tokens=20, temperature=0, stop_token_ids=[stop_id])[0]
    assert cut.finish_reason == "stop" and cut.token_ids == full.token_ids[: full.token_ids.index(stop_id) + 1]
    text = full.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip()
    by_str = engine.generate(["hello world"], max_tokens=20, temperature=0, stop=[stop], ignore_eos=True)[0]
    assert by_str.finish_reason == "stop" and by_str.text == text[: text.index(stop)]


def test_logprobs_match_log_softmax_of_reference_logits():
    model = _model()
    out = Engine(model).generate([[8, 9, 10]], max_tokens=6, temperature=0, ignore_eos=True, logprobs=True,
                                 top_logprobs=3)[0]
    ids, logits = _reference(model, [8, 9, 10], 6)
    for t, (tok_id, row) in enumerate(zip(ids, logits)):
        lp = row.log_softmax(-1)
        assert out.logprobs[t] == pytest.approx(float(lp[tok_id]), abs=1e-4)
        top = out.top_logprobs[t]
        assert list(top) == lp.topk(3).indices.tolist() and tok_id in top


def test_stream_yields_the_text_and_abort_frees_the_slot(tok):
    engine = Engine(_model(tok.vocab_size), tokenizer=tok, max_batch=1)
    deltas = list(engine.stream("hello", max_tokens=12, temperature=0, ignore_eos=True))
    assert "".join(deltas) == engine.last_output.text and len(deltas) > 1
    gen = engine.stream("hello", max_tokens=50, temperature=0, ignore_eos=True)
    next(gen)
    gen.close()  # the caller went away
    assert not engine.has_unfinished() and engine.free_slots == [0]
    rid = engine.add_request(Request("hello", SamplingParams(max_tokens=5)))
    assert engine.abort(rid) and not engine.abort(rid)


# ------------------------------------------------------------------------------------------ thinking
def test_thinking_budget_forces_end_of_thinking_after_n_tokens(tok):
    engine = Engine(_model(tok.vocab_size), tokenizer=tok)
    prompt = tok.encode("What is 12+30?<think>", add_bos=True)  # a template that pre-fills <think>
    out = engine.generate([prompt], max_tokens=12, temperature=0, ignore_eos=True, thinking_budget=5,
                          stop_token_ids=[tok.end_answer_id])[0]
    assert out.token_ids[5] == tok.end_think_id and tok.end_think_id not in out.token_ids[:5]
    assert out.reasoning == tok.decode(out.token_ids[:5], skip_special=True).strip()
    assert out.answer == tok.decode(out.token_ids[6:], skip_special=True).strip()


def test_min_thinking_replaces_early_end_of_thinking_with_wait(tok):
    bias = torch.zeros(tok.vocab_size)
    bias[tok.end_think_id] = 50.0  # this model wants to stop thinking at once
    model = _with_bias(_model(tok.vocab_size), bias)
    engine = Engine(model, tokenizer=tok)
    prompt = tok.encode("What is 12+30?<think>", add_bos=True)
    eager = engine.generate([prompt], max_tokens=3, temperature=0)[0]
    assert eager.token_ids[0] == tok.end_think_id
    wait = tok.encode("Wait")
    for speculative in (False, True):
        out = engine.generate([prompt], max_tokens=20, temperature=0, min_thinking_tokens=4, ignore_eos=True,
                              speculative=speculative)[0]
        end = out.token_ids.index(tok.end_think_id)
        assert end >= 4 and out.token_ids[: len(wait)] == wait and "Wait" in out.reasoning


@pytest.mark.parametrize("drafts", [1, 2])
@pytest.mark.parametrize("rule", [dict(thinking_budget=4), dict(thinking_budget=5), dict(min_thinking_tokens=6)])
def test_recorded_speculative_steps_follow_thinking_rules(tok, rule, drafts):
    """The fused speculative step with a thinking rule due: a draft accepted just before a forced `</think>` (or
    an early one turned into "Wait") must not be followed by a further token. Same output as plain decoding."""
    model = _rigged(vocab_size=tok.vocab_size, mtp=drafts)
    prompts = [tok.encode("What is 12+30?<think>", add_bos=True), tok.encode("hello world<think>", add_bos=True)]
    kw = dict(max_tokens=24, temperature=0, ignore_eos=True, **rule)
    plain = Engine(model, tokenizer=tok).generate(prompts, **kw)
    eager = Engine(model, tokenizer=tok).generate(prompts, speculative=True, **kw)
    recorded = Engine(model, tokenizer=tok, cuda_graphs=True).generate(prompts, speculative=True, **kw)
    assert [o.token_ids for o in recorded] == [o.token_ids for o in plain]
    # the same drafts as the eager speculative path (the output alone cannot show a draft made from the wrong pair)
    assert [(o.num_drafted, o.num_accepted) for o in recorded] == [(o.num_drafted, o.num_accepted) for o in eager]
    assert sum(o.num_accepted for o in recorded) > 0


@pytest.mark.parametrize("drafts", [1, 2])
def test_fused_speculative_step_keeps_the_state_the_general_step_keeps(tok, drafts):
    """Step by step, the fused step and the general verify + draft steps (taken when logprobs are asked for) leave
    the same drafts, the same kept hidden states and the same MTP caches, also when a thinking rule stops a step
    after an accepted draft (the output alone would not show a draft made from the wrong pair)."""
    model = _rigged(vocab_size=tok.vocab_size, mtp=drafts)
    fused, general = Engine(model, tokenizer=tok, cuda_graphs=True), Engine(model, tokenizer=tok, cuda_graphs=True)
    kw = dict(max_tokens=20, temperature=0, ignore_eos=True, speculative=True, thinking_budget=4)
    for prompt in ("What is 12+30?<think>", "hello world<think>"):
        fused.add_request(tok.encode(prompt, add_bos=True), **kw)
        general.add_request(tok.encode(prompt, add_bos=True), logprobs=True, **kw)
    L = model.config.num_hidden_layers
    # The two paths may send a different number of rows through the experts (few-rows path or grouped), whose
    # sums round differently on some CPUs: equal to float32 rounding. A state made from a wrong pair is far off.
    same = lambda x, y: torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    while fused.has_unfinished():
        fused.step(), general.step()
        assert [(s.out, s.drafts) for s in fused.running] == [(s.out, s.drafts) for s in general.running]
        for a, b in zip(fused.running, general.running):
            if drafts > 1:
                same(fused.cache.hidden[a.slot], general.cache.hidden[b.slot])
            same(fused.cache.latent[L:, a.slot, : a.n_cached], general.cache.latent[L:, b.slot, : b.n_cached])
    assert not general.has_unfinished()


def test_split_reasoning_and_answer():
    assert split_reasoning("<think>a b</think> c") == ("a b", "c")
    assert split_reasoning("a b</think><answer>42</answer>") == ("a b", "42")  # <think> was in the prompt
    assert split_reasoning("<think>x</think>y<answer>7</answer>z") == ("x", "7")
    assert split_reasoning("just text") == ("", "just text")
    assert split_reasoning("still thinking", think_open=True) == ("still thinking", "")
    assert split_reasoning("<think>cut off") == ("cut off", "")


# ------------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("kw, match", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"min_p": 2}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"thinking_budget": 4, "min_thinking_tokens": 8}, "cannot exceed"),
])
def test_contradictory_sampling_parameters_are_one_clear_error(kw, match):
    with pytest.raises(ValueError, match=match):
        Engine(_model(), max_batch=1).generate([[1, 2]], **{"max_tokens": 4, **kw})


def test_bad_prompts_and_directories(tmp_path):
    engine = Engine(_model(), max_batch=1, max_len=32)
    for k in (0, 2):  # the model has one MTP module: one draft per step at most
        with pytest.raises(ValueError, match="draft_tokens must be between 1 and 1"):
            Engine(_model(), draft_tokens=k)
    with pytest.raises(ValueError, match="prompt list is empty"):
        engine.generate([])
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.generate([[]])
    with pytest.raises(ValueError, match="40 tokens but the context holds 32"):
        engine.generate([list(range(40))])
    with pytest.raises(ValueError, match="no tokenizer"):
        engine.generate(["some text"])
    with pytest.raises(NotADirectoryError, match="not a model directory"):
        Engine(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Engine(tmp_path / "missing")


@pytest.mark.parametrize("drafts", [1, 2])
@pytest.mark.parametrize("cuda_graphs", [False, True])  # recorded steps: the key span is capped by the cache
def test_length_limit_of_the_context_ends_with_length(cuda_graphs, drafts):
    model = _model(mtp=drafts)
    engine = Engine(model, max_len=16, cuda_graphs=cuda_graphs)
    for speculative in (True, False):
        out = engine.generate([list(range(10))], max_tokens=100, temperature=0, ignore_eos=True,
                              speculative=speculative)[0]
        assert out.finish_reason == "length" and out.token_ids == _reference(model, list(range(10)), 6)[0]


def test_cache_bytes_per_token_and_loading_from_a_directory(tmp_path, tok):
    model = _model(tok.vocab_size)
    save_model(model, tmp_path / "m", tokenizer=tok)
    engine = nanoseek.Engine(tmp_path / "m", dtype=torch.bfloat16)
    cfg = model.config
    assert engine.cache_bytes_per_token == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 2
    assert engine.cache_bytes_per_token == LatentCache.bytes_per_token(cfg, torch.bfloat16)
    out = engine.generate(["hello"], max_tokens=4, temperature=0, chat=True)[0]
    assert out.prompt_token_ids[:2] == [tok.bos_id, tok.user_id] and out.prompt_token_ids[-1] == tok.assistant_id


# ------------------------------------------------------------------------------------------ commands
def _cli(capsys, monkeypatch, *args, stdin: str = "") -> tuple[int, str, str]:
    """Run `nanoseek ARGS` in this process (a subprocess would spend seconds importing torch), stdin piped."""
    from nanoseek.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main([*args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_and_chat_commands(tmp_path, tok, capsys, monkeypatch):
    save_model(_model(tok.vocab_size), tmp_path / "m", tokenizer=tok)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "hello"}) + "\n" +
                       json.dumps({"messages": [{"role": "user", "content": "What is 12+30?"}]}) + "\n")
    code, out, err = _cli(capsys, monkeypatch, "generate", str(tmp_path / "m"), "--prompts", str(prompts),
                          "--out", str(tmp_path / "o.jsonl"), "--max-tokens", "5", "--speculative", "--device", "cpu")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["id"] == "a" and rows[1]["completion_tokens"] <= 5 and "answer" in rows[0]
    assert "2 prompts" in out
    txt = tmp_path / "p.txt"
    txt.write_text("one\n\ntwo\n")
    code, out, err = _cli(capsys, monkeypatch, "generate", str(tmp_path / "m"), "--prompts", str(txt),
                          "--out", str(tmp_path / "o2.jsonl"), "--temperature", "-1", "--device", "cpu")
    assert code == 2 and "temperature must be >= 0" in err and not (tmp_path / "o2.jsonl").exists()
    code, out, err = _cli(capsys, monkeypatch, "chat", str(tmp_path / "m"), "--max-tokens", "4", "--device", "cpu",
                          stdin="hello\n/budget 3\n/reset\nhi again\n/quit\nnever read\n")
    assert code == 0, err
    assert out.count("model>") == 2 and "thinking budget: 3" in err
    code, out, err = _cli(capsys, monkeypatch, "generate", str(tmp_path), "--prompts", str(txt),
                          "--out", str(tmp_path / "o3.jsonl"))
    assert code == 2 and "not a model directory" in err
