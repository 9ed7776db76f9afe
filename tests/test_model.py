"""The model: parity with transformers both ways, absorbed decode == full path, grouped GEMM == loop."""

import json
import time

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import DeepseekV3ForCausalLM as HFDeepseekV3

from nanoseek.checkpoint import load_model, read_tensors, save_model, to_hub_state_dict
from nanoseek.config import ModelConfig, depth, preset, smoke, tiny
from nanoseek.fp8 import quantize_blockwise
from nanoseek.infer.cache import LatentCache
from nanoseek.model.linear import FEW_ROWS_IN_FEATURES, linear, weight_stationary
from nanoseek.model.moe import FEW_ROWS, RoutedExperts, grouped_linear
from nanoseek.model.transformer import DeepseekV3ForCausalLM

YARN = {"type": "yarn", "factor": 4.0, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 32}

PARITY_CONFIGS = {
    # q_lora None, one group, one dense layer
    "q_proj": smoke().replace(q_lora_rank=None, n_group=1, topk_group=1),
    # q LoRA, group-limited routing (4 groups keep 2), YaRN, MTP weights present
    "grouped_yarn_mtp": smoke().replace(rope_scaling=YARN),
    # two dense layers, 3 experts per token, classic rotate-half RoPE, no top-k normalisation
    "dense2_top3": smoke().replace(num_hidden_layers=3, first_k_dense_replace=2, num_experts_per_tok=3,
                                    n_group=2, topk_group=1, rope_interleave=False, norm_topk_prob=False,
                                    n_shared_experts=2),
}


def _randomise(model: DeepseekV3ForCausalLM) -> DeepseekV3ForCausalLM:
    """Make the parts that initialise to constants (norms, router bias) matter for the comparison."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0.0, 0.05)
    return model.eval()


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_nanoseek_checkpoint_loads_in_transformers_with_same_logits(tmp_path, name):
    ours = _randomise(DeepseekV3ForCausalLM(PARITY_CONFIGS[name]))
    save_model(ours, tmp_path)
    theirs = HFDeepseekV3.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 48))
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    assert diff <= 1e-4


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_transformers_checkpoint_loads_in_nanoseek_with_same_logits(tmp_path, name):
    # Build the reference from our checkpoint's config, then let transformers re-initialise and save its own.
    save_model(DeepseekV3ForCausalLM(PARITY_CONFIGS[name]), tmp_path / "cfg")
    theirs = HFDeepseekV3.from_pretrained(tmp_path / "cfg", dtype=torch.float32).eval()
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            p.normal_(1.0 if n.endswith("norm.weight") else 0.0, 0.2 if n.endswith("norm.weight") else 0.05)
        for n, b in theirs.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.05)
    theirs.save_pretrained(tmp_path / "hf")
    with pytest.warns(UserWarning, match="MTP"):  # transformers stores no MTP weights
        ours = load_model(tmp_path / "hf")
    assert len(ours.mtp_modules) == 0
    ids = torch.randint(0, ours.config.vocab_size, (2, 48))
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_absorbed_decode_from_empty_cache_matches_full_path(name):
    model = _randomise(DeepseekV3ForCausalLM(PARITY_CONFIGS[name]))
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        full = model(ids)
        cache = LatentCache(model.config, num_slots=2, max_len=32)
        slots = torch.tensor([0, 1])
        for t in range(ids.shape[1]):
            pos = torch.full((2, 1), t)
            step = model(ids[:, t : t + 1], pos, cache.bind(slots, pos), prefill=False)
            assert (step[:, 0] - full[:, t]).abs().max().item() <= 1e-5, f"position {t}"


def test_prefill_then_decode_matches_full_path_and_slots_are_independent():
    model = _randomise(DeepseekV3ForCausalLM(smoke()))
    ids = torch.randint(0, model.config.vocab_size, (1, 20))
    other = torch.randint(0, model.config.vocab_size, (1, 7))
    with torch.no_grad():
        full = model(ids)
        cache = LatentCache(model.config, num_slots=3, max_len=32)
        model(other, torch.arange(7)[None], cache.bind(torch.tensor([0]), torch.arange(7)[None]))  # a neighbour
        pos = torch.arange(12)[None]
        pre = model(ids[:, :12], pos, cache.bind(torch.tensor([2]), pos), prefill=True)
        assert (pre - full[:, :12]).abs().max() <= 1e-5
        pos = torch.arange(12, 20)[None]  # a chunk of 8 new tokens over the cached 12
        rest = model(ids[:, 12:], pos, cache.bind(torch.tensor([2]), pos), prefill=False)
        assert (rest - full[:, 12:]).abs().max() <= 1e-5


def test_an_mtp_module_asked_for_one_output_per_row_gives_that_output_and_caches_every_pair():
    # The last MTP module of a speculative step runs past attention only at each row's newest pair.
    model = _randomise(DeepseekV3ForCausalLM(smoke()))
    B, T, D = 2, 5, model.config.hidden_size
    hidden, ids, only = torch.randn(B, T, D), torch.randint(0, model.config.vocab_size, (B, T)), torch.tensor([4, 2])
    at = torch.arange(B)
    with torch.no_grad():
        for prefill in (None, True, False):  # no cache; a prompt (full attention); pairs over a cache (absorbed)
            caches = [LatentCache(model.config, num_slots=B, max_len=16) for _ in range(2)]
            pos = torch.arange(T).expand(B, T) + (0 if prefill is not False else 3)
            outs = []
            for cache, o in zip(caches, (None, only)):
                if prefill is False:  # three earlier pairs already cached
                    early = torch.arange(3).expand(B, 3)
                    model.mtp_hidden(0, hidden[:, :3], ids[:, :3], early, cache.bind(at, early), prefill=True)
                bound = None if prefill is None else cache.bind(at, pos)
                outs.append(model.mtp_hidden(0, hidden, ids, pos, bound, prefill is not False, o))
            assert outs[1].shape == (B, 1, D)
            assert torch.allclose(outs[1][:, 0], outs[0][at, only], atol=1e-5), prefill
            assert torch.equal(caches[0].latent, caches[1].latent)


def _loop_experts(experts: RoutedExperts, x, ids, weights):
    """Reference: one expert at a time, one token at a time."""
    out = torch.zeros_like(x)
    I = experts.down_proj.shape[2]
    for n in range(x.shape[0]):
        for slot in range(ids.shape[1]):
            e = int(ids[n, slot])
            gate, up = experts.gate_up_proj[e, :I], experts.gate_up_proj[e, I:]
            h = torch.nn.functional.silu(gate @ x[n]) * (up @ x[n])
            out[n] = out[n] + weights[n, slot] * (experts.down_proj[e] @ h)
    return out


@pytest.mark.parametrize("hidden", [32, 30])  # 30: unaligned rows, so the padded-bmm fallback runs
def test_grouped_gemm_experts_match_per_expert_loop_forward_and_backward(hidden):
    cfg = smoke().replace(hidden_size=hidden)
    experts = RoutedExperts(cfg)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    x = torch.randn(40, hidden, requires_grad=True)
    ids = torch.stack([torch.randperm(8)[:2] for _ in range(40)])
    ids[:5] = torch.tensor([3, 5])  # an uneven load, and experts with no tokens
    weights = torch.rand(40, 2)

    fast = experts(x, ids, weights)
    fast.pow(2).sum().backward()
    g_fast = [t.grad.clone() for t in (x, experts.gate_up_proj, experts.down_proj)]
    for t in (x, experts.gate_up_proj, experts.down_proj):
        t.grad = None
    ref = _loop_experts(experts, x, ids, weights)
    ref.pow(2).sum().backward()
    assert torch.allclose(fast, ref, atol=1e-5)
    for a, t in zip(g_fast, (x, experts.gate_up_proj, experts.down_proj)):
        assert torch.allclose(a, t.grad, atol=1e-4)


def test_few_rows_inference_path_equals_reference():
    # decoding or verifying a few tokens: each chosen expert over all the rows, weights used in place
    torch.manual_seed(0)
    experts = RoutedExperts(smoke())
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    E, k = experts.gate_up_proj.shape[0], 2
    for n in range(1, FEW_ROWS + 1):
        x, ids, weights = torch.randn(n, experts.down_proj.shape[1]), torch.randint(0, E, (n, k)), torch.rand(n, k)
        with torch.no_grad():
            few = experts._few_rows(x, ids, weights)
            assert torch.equal(experts(x, ids, weights), few)  # the path inference takes
        assert torch.allclose(few, _loop_experts(experts, x, ids, weights), atol=1e-5)


def test_few_rows_cpu_linear_is_weight_stationary_and_equal():
    # 2-4 rows at inference on a CPU run as (W x^T)^T, MKL's faster layout there; the product is the same
    w, b = torch.randn(24, 16), torch.randn(24)
    for shape in ((2, 16), (3, 16), (1, 4, 16), (2, 2, 16)):
        x = torch.randn(shape)
        with torch.no_grad():
            assert weight_stationary(x, w)
            out = linear(x, w, b)
        assert out.shape == (*shape[:-1], 24) and out.is_contiguous()
        assert torch.allclose(out, F.linear(x, w, b), atol=1e-5)
    with torch.no_grad():  # one row, five rows, and inputs too wide for this layout keep F.linear
        assert not any(weight_stationary(torch.randn(n, 16), w) for n in (1, 5))
        assert not weight_stationary(torch.randn(3, FEW_ROWS_IN_FEATURES + 1), torch.randn(8, FEW_ROWS_IN_FEATURES + 1))
        assert not weight_stationary(torch.randn(3, 16, dtype=torch.float64), w.double())
    assert not weight_stationary(torch.randn(3, 16), w)  # training: autograd goes through F.linear


def test_grouped_linear_fallback_equals_grouped_mm():
    x = torch.randn(13, 16)
    w = torch.randn(4, 8, 16)
    counts = torch.tensor([5, 0, 6, 2])
    offsets = counts.cumsum(0).to(torch.int32)
    fast = grouped_linear(x, w, counts, offsets)
    x_unaligned, w_unaligned = x[:, :15], w[:, :, :15]  # 15 columns: not 16-byte aligned -> bmm fallback
    slow = grouped_linear(x_unaligned.contiguous(), w_unaligned.contiguous(), counts, offsets)
    ref = torch.cat([x[:5] @ w[0].T, x[5:11] @ w[2].T, x[11:] @ w[3].T])
    assert torch.allclose(fast, ref, atol=1e-5)
    ref_u = torch.cat([x_unaligned[:5] @ w_unaligned[0].T, x_unaligned[5:11] @ w_unaligned[2].T,
                       x_unaligned[11:] @ w_unaligned[3].T])
    assert torch.allclose(slow, ref_u, atol=1e-5)


def test_bf16_autocast_forward_backward_close_to_fp32():
    model = DeepseekV3ForCausalLM(smoke()).train()
    ids = torch.randint(0, 512, (2, 32))
    loss32, _ = model.loss(ids[:, :-1], ids[:, 1:])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, metrics = model.loss(ids[:, :-1], ids[:, 1:])
    loss16.backward()
    assert torch.isfinite(loss16) and abs(loss16.item() - loss32.item()) < 0.05
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    assert "mtp_loss" in metrics


def test_mtp_loss_weight_and_targets():
    model = DeepseekV3ForCausalLM(smoke()).train()
    ids = torch.randint(0, 512, (2, 17))
    total, m = model.loss(ids[:, :-1], ids[:, 1:])
    assert torch.allclose(total, m["main_loss"] + 0.3 * m["mtp_loss"], atol=1e-6)
    total0, m0 = model.loss(ids[:, :-1], ids[:, 1:], mtp_weight=0.0)
    assert "mtp_loss" not in m0 and torch.allclose(total0, m0["main_loss"])
    # MTP module 0 predicts two tokens ahead: its loss must not depend on the last input's next-token target only.
    logits, _ = model.mtp_step(0, model.hidden_states(ids[:, :-2]), ids[:, 1:-1])
    assert logits.shape == (2, 15, 512)


def test_aux_loss_free_bias_moves_against_load_and_aux_losses_switch_on():
    cfg = smoke().replace(bias_update_speed=0.01, seq_aux_loss_alpha=1e-2, router_z_loss_coeff=1e-3)
    model = DeepseekV3ForCausalLM(cfg).train()
    moe = model.moe_layers()[0]
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[0] += 1.0  # expert 0 wins for every token with positive mean input
    ids = torch.randint(0, 512, (4, 32))
    _, metrics = model.loss(ids[:, :-1], ids[:, 1:])
    assert metrics["aux_loss"] > 0
    counts = moe.load_counts.clone()
    stats = model.update_expert_bias()
    bias = moe.gate.e_score_correction_bias
    over, under = counts > counts.mean(), counts < counts.mean()
    assert torch.all(bias[over] == -0.01) and torch.all(bias[under] == 0.01)
    assert stats[0]["load_max_over_mean"] == pytest.approx(float(counts.max() / counts.mean()))
    assert moe.load_counts.sum() == 0  # reset for the next step


# ------------------------------------------------------------------------------------------ checkpoints
def test_sharded_checkpoint_round_trip_and_hub_expert_keys(tmp_path):
    model = _randomise(DeepseekV3ForCausalLM(smoke()))
    save_model(model, tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    keys = set(index["weight_map"])
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in keys
    assert "model.layers.2.eh_proj.weight" in keys and "model.layers.2.shared_head.head.weight" in keys
    assert not any(k.endswith("gate_up_proj") for k in keys)
    assert len(set(index["weight_map"].values())) > 1
    again = load_model(tmp_path)
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
    assert not [p for p in tmp_path.parent.iterdir() if p.name.endswith(".tmp")]


def test_fp8_checkpoint_in_official_format_loads_dequantised(tmp_path):
    model = _randomise(DeepseekV3ForCausalLM(smoke().replace(num_nextn_predict_layers=0)))
    save_model(model, tmp_path / "bf")
    tensors = read_tensors(tmp_path / "bf")
    fp8 = {}
    for name, t in tensors.items():
        if name.endswith("proj.weight") and t.dim() == 2:  # every linear but embedding, head and router
            fp8[name], fp8[name + "_scale_inv"] = quantize_blockwise(t)
        else:
            fp8[name] = t
    (tmp_path / "fp8").mkdir()
    save_file(fp8, str(tmp_path / "fp8" / "model.safetensors"))
    cfg = json.loads((tmp_path / "bf" / "config.json").read_text())
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": [128, 128]}
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(cfg))
    loaded = load_model(tmp_path / "fp8")
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        rel = (loaded(ids) - model(ids)).norm() / model(ids).norm()
    assert 0 < rel < 0.05  # E4M3 keeps ~3 mantissa bits: close, not identical


def test_mismatched_checkpoint_names_tensor_and_both_shapes(tmp_path):
    save_model(DeepseekV3ForCausalLM(smoke()), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["kv_lora_rank"] = 32
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"kv_a_proj_with_mqa.weight has shape \[24, 32\] but config.json implies \[40, 32\]"):
        load_model(tmp_path)


def test_not_a_model_directory_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(NotADirectoryError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(tmp_path)


def test_run_directory_resolves_to_its_model(tmp_path):
    save_model(DeepseekV3ForCausalLM(smoke()), tmp_path / "run" / "model")
    (tmp_path / "run" / "config.json").write_text("{}")  # a run's own config sits beside its model
    assert isinstance(load_model(tmp_path / "run"), DeepseekV3ForCausalLM)


# ------------------------------------------------------------------------------------------ config
def test_config_round_trips_through_hf_dict_and_file(tmp_path):
    cfg = smoke().replace(rope_scaling=YARN, mtp_loss_weight=0.1, q_lora_rank=None)
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    cfg.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path) == cfg


def test_v5_rope_parameters_layout_is_read():
    d = smoke().to_hf_dict()
    del d["rope_scaling"], d["rope_theta"]
    d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 5000.0, **{k: v for k, v in YARN.items() if k != "type"}}
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.rope_theta == 5000.0 and cfg.rope_scaling["factor"] == 4.0


@pytest.mark.parametrize("change, message", [
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ({"n_group": 3}, "divisible by n_group"),
    ({"topk_group": 5}, "topk_group"),
    ({"qk_rope_head_dim": 7}, "even"),
    ({"scoring_func": "softmax"}, "sigmoid"),
])
def test_bad_config_gives_one_clear_sentence(change, message):
    with pytest.raises(ValueError, match=message):
        smoke().replace(**change)


def test_deepseek_v3_softmax_scale_matches_reference():
    assert preset("deepseek-v3").softmax_scale == pytest.approx(0.13523, abs=1e-5)


def test_presets_build_and_have_the_promised_sizes():
    t0 = time.process_time()  # CPU time, so a busy machine does not fail the test
    model = DeepseekV3ForCausalLM(smoke())
    model(torch.randint(0, 512, (1, 16)))
    assert time.process_time() - t0 < 1.0
    cfg = tiny()
    with torch.device("meta"):
        n = sum(p.numel() for p in DeepseekV3ForCausalLM(cfg).parameters())
    assert 5e6 <= n <= 20e6 and cfg.n_routed_experts >= 8
    assert [depth(d).hidden_size for d in (4, 8, 12)] == [256, 512, 768]
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")


def test_to_hub_state_dict_has_no_fused_or_nonpersistent_keys():
    keys = set(to_hub_state_dict(DeepseekV3ForCausalLM(smoke())))
    assert not any("rotary_emb" in k or "load_counts" in k or "gate_up_proj" in k for k in keys)
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in keys


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleave", [True, False])
def test_rope_spellings_agree(dtype, interleave):
    """Eager rope is a complex product, compiled rope the real form (inductor has no complex numbers): the same
    numbers, for both pairings, on a non-contiguous slice as MLA hands it over."""
    from nanoseek.model.rope import _rotate_complex, _rotate_real

    x = torch.randn(2, 5, 3, 24).to(dtype)[..., 8:]
    angles = torch.randn(2, 5, 1, 8)
    a = _rotate_complex(x, angles.cos(), angles.sin(), interleave)
    b = _rotate_real(x, angles.cos(), angles.sin(), interleave)
    assert a.dtype == dtype and torch.allclose(a.float(), b.float(), atol=1e-6 if dtype == torch.float32 else 1e-2)
    assert (a.float() - x.float()).abs().max() > 0.1  # it did rotate

