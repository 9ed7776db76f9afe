"""Cost model: parameter counts against built models, FLOPs against DeepSeek's own figures, receipts, the CLI."""

import json
import os

import pytest

from nanoseek import cost
from nanoseek.cli import main
from nanoseek.config import preset


@pytest.fixture(autouse=True)
def _no_user_devices_file(tmp_path, monkeypatch):
    """A devices file in the tester's home must not change the numbers under test."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))


def _configs():
    smoke = preset("smoke")
    return {
        "smoke": smoke,
        "smoke-no-mtp": smoke.replace(num_nextn_predict_layers=0),
        # q_lora_rank=None takes the single q_proj path; attention_bias adds the q_a/kv_a/o_proj biases.
        "q-proj": smoke.replace(q_lora_rank=None, n_shared_experts=2, first_k_dense_replace=0),
        "q-proj-bias": smoke.replace(q_lora_rank=None, attention_bias=True, num_nextn_predict_layers=0),
        "dense-first-two": smoke.replace(num_hidden_layers=3, first_k_dense_replace=2, num_nextn_predict_layers=2),
    }


# ---------------------------------------------------------------------------------------------- hand counts
def test_smoke_hand_count():
    # smoke: V=512, h=32, 2 layers (layer 0 dense, layer 1 MoE), 2 heads, q_lora 24, kv_lora 16, dims 8/8/8.
    # attention/layer: q_a 32*24 + norm 24 + q_b 24*2*16 + kv_a 32*24 + norm 16 + kv_b 16*2*16 + o 2*8*32 = 3368
    # dense FFN 3*32*64 = 6144; MoE: 8 routed + 1 shared experts of 3*32*16 = 1536, router 8*32 -> 14080
    # norms 2*2*32 + 32 = 160; embedding = head = 512*32 = 16384
    main_total = 2 * 16384 + 2 * 3368 + 6144 + 14080 + 160
    # MTP module: one MoE layer (3368 + 64 + 14080) + eh_proj 32*64 + enorm/hnorm/shared_head.norm 3*32
    mtp = 3368 + 64 + 14080 + 2048 + 96
    # active: the MoE layer touches 2 routed + 1 shared expert + the router: 3*1536 + 256
    active = 2 * 16384 + 2 * 3368 + 6144 + (3 * 1536 + 256) + 160
    pc = cost.param_counts(preset("smoke"))
    assert (pc["main_total"], pc["mtp"], pc["total"], pc["active"]) == (main_total, mtp, main_total + mtp, active)

    # FLOPs at seq 64: matmul weights (no norms, no embedding) = head 16384 + layer 0 (3328 + 6144)
    # + layer 1 (3328 + 4864); attention/layer = 2 * heads 2 * (16 + 8) * 32 avg keys = 3072
    fwd = 2 * (16384 + 3328 + 6144 + 3328 + 4864) + 2 * 3072
    # MTP: its layer's matmuls + eh_proj + the shared head again, and its own attention
    fwd_mtp = 2 * (3328 + 4864 + 2048 + 16384) + 3072
    cfg = preset("smoke")
    assert cost.flops_per_token(cfg, 64, training=False, include_mtp=False) == fwd
    assert cost.flops_per_token(cfg, 64, include_mtp=False) == 3 * fwd
    assert cost.flops_per_token(cfg, 64) == 3 * (fwd + fwd_mtp)


@pytest.mark.parametrize("name", list(_configs()))
def test_counts_match_transformers(name):
    """transformers builds the main model only (no MTP), with our exact names and shapes."""
    transformers = pytest.importorskip("transformers")
    cfg = _configs()[name]
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**cfg.to_hf_dict()))
    assert cost.param_counts(cfg)["main_total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(_configs()))
def test_counts_match_our_model(name):
    transformer = pytest.importorskip("nanoseek.model.transformer")
    cfg = _configs()[name]
    model = transformer.DeepseekV3ForCausalLM(cfg)
    assert cost.param_counts(cfg)["total"] == sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- 671B
def test_671b_parameter_counts():
    pc = cost.param_counts(preset("deepseek-v3"))
    assert abs(pc["main_total"] - 671e9) / 671e9 < 0.001  # "671B total" [V3]
    assert abs(pc["active"] - 37e9) / 37e9 < 0.02  # "37B activated", rounded [V3]
    assert abs(pc["mtp"] - 11.5e9) / 11.5e9 < 0.02  # "MTP adds 11.5B unique" [README_WEIGHTS]
    # "2.4B activated" for MTP counts the shared embedding and head (0.93B each) as its own
    assert abs(pc["mtp_active"] + 2 * pc["embedding"] - 2.4e9) / 2.4e9 < 0.1


def test_671b_flops_vs_6n():
    """Training FLOPs/token at 4096 against the textbook 6 x 37B + causal attention.

    Tolerance, derived: the published 37B (i) counts the 0.93B embedding, a lookup that does no matmul (we drop
    it: 6 x 0.93B = 5.6 GFLOP), and (ii) is rounded: our own count is 37.55B, so rounding hides up to +-0.5B
    (3 GFLOP). Norms (<1M parameters) and the router are inside that. So |ours - reference| <= 6 x (0.93 + 0.5)B
    = 8.6 GFLOP out of ~253 GFLOP: 3.4%. We land at -0.9% (36.6B of matmul weights vs 37B).
    """
    cfg = preset("deepseek-v3")
    L, H, qk, v, seq = 61, 128, 192, 128, 4096
    attention = 3 * L * 2 * H * (qk + v) * seq / 2  # fwd + bwd, scores and values, causal half
    reference = 6 * 37e9 + attention
    ours = cost.flops_per_token(cfg, seq, include_mtp=False)
    assert abs(ours - reference) / reference < 6 * (0.93e9 + 0.5e9) / reference
    # MTP (D=1) adds one layer, eh_proj and a second pass through the head: 6 x 1.61B + one layer's attention
    extra = cost.flops_per_token(cfg, seq) - ours
    assert extra == pytest.approx(6 * cost.param_counts(cfg)["mtp_matmul_active"] + attention / L)
    assert 9e9 < extra < 11e9


# ---------------------------------------------------------------------------------------------- published
def test_published_v3_table_reproduces():
    rows = {r["stage"]: r for r in cost.published()["deepseek_v3"]}
    assert rows["Total"]["gpu_hours"] == 2788e3
    assert rows["Total"]["dollars"] == pytest.approx(5.576e6)
    assert rows["Pre-training"]["dollars"] == pytest.approx(5.328e6)
    # 343 TFLOP/s per GPU is 6N alone (REFERENCE §3.5); with attention and MTP our MFU is a bit higher.
    assert 0.35 < rows["Pre-training"]["mfu_bf16"] < 0.45
    assert rows["Pre-training"]["mfu_fp8"] == pytest.approx(rows["Pre-training"]["mfu_bf16"] / 2, rel=1e-3)
    assert 0.1 < rows["Context extension"]["mfu_bf16"] < 0.5


def test_published_r1_s1_tinyzero_serving():
    p = cost.published()
    r1 = {r["stage"]: r for r in p["deepseek_r1"]}
    assert r1["Total"]["dollars"] == 294e3 and r1["Total"]["gpu_hours"] == 147e3
    assert p["s1"]["h100_hours"] == pytest.approx(6.93, abs=0.01)
    assert p["tinyzero"]["dollars_under"] == 30
    # DeepSeek's decode: 14.8K tok/s per 8 x H800 node at $2 each -> $0.30 per 1M output tokens
    assert p["serving"]["deepseek_h800_node_dollars_per_million_output"] == pytest.approx(0.3003, abs=1e-4)
    assert cost.dollars_per_million_output_tokens(1000, 3.6) == pytest.approx(1.0)


def test_cli_published(capsys):
    assert main(["cost", "--published"]) == 0
    out = capsys.readouterr().out
    assert "2,788K" in out and "$5.576M" in out and "$294K" in out and "147K" in out
    assert main(["cost", "--published", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["deepseek_v3"][-1]["gpu_hours"] == 2788e3


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_json_keys(capsys):
    assert main(["cost", "--preset", "deepseek-v3", "--tokens", "14.8T", "--device", "H800",
                 "--num-devices", "2048", "--mfu", "0.4", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    for key in ("flops_per_token", "total_flops", "device_hours", "dollars", "mfu", "tokens_per_second",
                "wall_hours", "peak_flops_per_device", "price_per_device_hour", "seq_len"):
        assert key in d
    assert d["seq_len"] == 4096 and d["mfu"] == 0.4 and d["device"] == "H800"
    assert d["dollars"] == pytest.approx(2 * d["device_hours"])
    assert d["device_hours"] == pytest.approx(d["total_flops"] / (0.4 * 989.4e12) / 3600)


def test_cli_reverse_mode_matches_published(capsys):
    assert main(["cost", "--preset", "deepseek-v3", "--tokens", "14.8T", "--device", "h800",
                 "--gpu-hours", "2664K", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["mfu"] == pytest.approx(cost.published()["deepseek_v3"][0]["mfu_bf16"])
    assert d["dollars"] == pytest.approx(5.328e6)


def test_cli_throughput_and_text(capsys):
    assert main(["cost", "--preset", "tiny", "--tokens", "2M", "--device", "h100",
                 "--tokens-per-second", "1e5", "--price", "0"]) == 0
    out = capsys.readouterr().out
    assert "MFU" in out and "$0.00" in out and "100,000 tokens/s" in out


def test_cli_serve(capsys):
    assert main(["cost", "--serve", "14.8K", "--device", "h800", "--num-devices", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dollars_per_million_output_tokens"] == pytest.approx(0.3003, abs=1e-4)


@pytest.mark.parametrize("argv, words", [
    (["--preset", "tiny", "--tokens", "1B", "--device", "tpu9000"], "unknown device"),
    (["--preset", "nope", "--tokens", "1B"], "unknown preset"),
    (["--preset", "tiny", "--tokens=-5B"], "must be positive"),
    (["--preset", "tiny", "--tokens", "lots"], "is not a number"),
    (["--preset", "tiny", "--tokens", "1B", "--mfu", "40"], "fraction"),
    (["--preset", "tiny", "--tokens", "1B", "--num-devices", "1.5"], "whole number"),
    (["--preset", "tiny", "--tokens", "1B", "--price", "cheap"], "--price"),
    (["--preset", "tiny"], "--tokens"),
    (["--tokens", "1B"], "--preset"),
    (["--preset", "tiny", "--tokens", "1B", "--device", "a100", "--precision", "fp8"], "no fp8 peak"),
    (["--preset", "tiny", "--tokens", "1B", "--devices", "/no/such/devices.json"], "does not exist"),
])
def test_cli_errors_are_one_line(capsys, argv, words):
    assert main(["cost", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nanoseek cost: error:") and words in err


@pytest.mark.parametrize("text, words", [
    ("{not json", "does not parse"),
    ('["h100"]', "must be an object"),
    ('{"h100": 3}', "must be an object like"),
    ('{"h100": {"price": 3}}', "not a device field"),
    ('{"h100": {"price_per_hour": -1}}', "non-negative number"),
    ('{"h100": {"price_per_hour": "3"}}', "non-negative number"),
    ('{"mi300x": {"price_per_hour": 4}}', "needs at least bf16_tflops"),
])
def test_bad_devices_file(tmp_path, capsys, text, words):
    path = tmp_path / "devices.json"
    path.write_text(text)
    assert main(["cost", "--preset", "tiny", "--tokens", "1B", "--devices", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err


# ---------------------------------------------------------------------------------------------- devices
def test_devices_file_overrides_and_adds(tmp_path):
    path = tmp_path / "devices.toml"
    path.write_text('[H100]\nprice_per_hour = 2.25\n\n[MI300X]\nbf16_tflops = 1307.4\nfp8_tflops = 2614.9\n'
                    'price_per_hour = 4.0\n\n[cpu]\nfp32_tflops = 0.5\nbf16_tflops = 0.1\n')
    assert cost.get_device("h100", path).price_per_hour == 2.25
    assert cost.get_device("h100", path).bf16_tflops == 989.4  # other fields kept
    assert cost.get_device("mi-300x", path).peak_flops("fp8") == pytest.approx(2614.9e12)
    assert cost.get_device("cpu", path).peak_flops("fp32") == pytest.approx(0.5e12)  # pinned: no measurement
    # the default user file is read too
    (tmp_path / "xdg" / "nanoseek").mkdir(parents=True)
    (tmp_path / "xdg" / "nanoseek" / "devices.json").write_text('{"h800": {"price_per_hour": 1.5}}')
    assert cost.get_device("H800").price_per_hour == 1.5


def test_device_names_and_peaks():
    assert cost.get_device("H100-SXM").peak_flops("bf16") == pytest.approx(989.4e12)
    assert cost.get_device("RTX 4090").name == "RTX 4090"
    assert cost.get_device("h800").peak_flops("fp8") == pytest.approx(1978.9e12)
    with pytest.raises(ValueError, match="no fp8 peak"):
        cost.get_device("a100").peak_flops("fp8")


def test_cpu_peak_measured_and_cached():
    first = cost.measure_cpu_peak()
    assert first["fp32"] > 0 and first["bf16"] > 0  # speed depends on the machine and its load: not tested
    assert cost.measure_cpu_peak() is first
    cpu = cost.get_device("cpu")
    assert cpu.price_per_hour == 0 and cpu.peak_flops("fp32") == pytest.approx(first["fp32"])
    assert cost.default_precision("cpu") == "fp32"


# ---------------------------------------------------------------------------------------------- receipts
def test_receipt_derived_roundtrip_and_atomic_write(tmp_path):
    r = cost.make_receipt("pretrain", "h100", wall_seconds=7200, tokens=1_000_000_000, flops=2.0e18,
                          num_devices=8, steps=100)
    assert r.device == "H100" and r.device_hours == 16 and r.dollars == 48
    assert r.mfu == pytest.approx(2.0e18 / (7200 * 8 * 989.4e12))
    assert r.tokens_per_second == pytest.approx(1e9 / 7200)
    p = r.projected("h100", mfu=0.5)
    assert p["device_hours"] == pytest.approx(2.0e18 / (989.4e12 * 0.5) / 3600)
    assert p["dollars"] == pytest.approx(3 * p["device_hours"])

    path = tmp_path / "run" / "receipt.json"
    cost.write_receipt(r, path)
    assert os.listdir(path.parent) == ["receipt.json"]  # no temporary left behind
    d = json.loads(path.read_text())
    assert d["dollars"] == 48 and d["extra"] == {"steps": 100}
    assert cost.read_receipt(path) == r

    rows = cost.summarize([r, r])
    assert rows[-1]["stage"] == "Total" and rows[-1]["dollars"] == 96
    with pytest.raises(ValueError, match="missing"):
        cost.Receipt.from_dict({"stage": "x"})


def test_parse_count():
    assert cost.parse_count("14.8T") == 14.8e12
    assert cost.parse_count("500B") == 500e9
    assert cost.parse_count("2M") == 2e6
    assert cost.parse_count("1e9") == 1e9
    assert cost.parse_count("2,664K") == 2.664e6
    assert cost.parse_count("1_000") == 1000
    for bad in ("", "T", "1.2.3", "5X", "0", "-1"):
        with pytest.raises(ValueError):
            cost.parse_count(bad)


def test_config_file(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(preset("smoke").to_hf_dict()))
    assert main(["cost", "--config", str(tmp_path), "--tokens", "1M", "--device", "h100", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["flops_per_token"] == cost.flops_per_token(preset("smoke"), 256)


def test_cpu_peak_remembers_the_best_measurement(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOSEEK_CACHE_DIR", str(tmp_path))
    quiet = cost._best_ever_cpu_peak({"fp32": 100e9, "bf16": 2e9}, threads=2)
    busy = cost._best_ever_cpu_peak({"fp32": 10e9, "bf16": 3e9}, threads=2)  # a loaded machine measures low
    assert quiet == {"fp32": 100e9, "bf16": 2e9}
    assert busy == {"fp32": 100e9, "bf16": 3e9}  # never lower than seen before, so MFU is never inflated
    other = cost._best_ever_cpu_peak({"fp32": 5e9, "bf16": 1e9}, threads=1)  # another thread count: its own record
    assert other == {"fp32": 5e9, "bf16": 1e9}
