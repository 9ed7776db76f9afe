"""FP8 (issue 7): quantisation bounds per granularity, the FP8 linear and experts against float64 references of the
same quantised computation, FP8 training conversion, `nanoseek convert`, and FP8 weights in memory. All on CPU."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from nanoseek.checkpoint import load_model, read_tensors, save_model
from nanoseek.config import depth, smoke
from nanoseek.fp8 import (E4M3_MAX, TILE, WEIGHT_BLOCK, FP8Linear, FP8RoutedExperts, convert_to_fp8_training,
                          dequantize_blockwise, expand_scale, fake_quantize, fake_quantize_token_tiles, fp8_to_float,
                          memory_report, quantize, quantize_blockwise, revert_fp8_training)
from nanoseek.fp8_infer import FP8WeightExperts, FP8WeightLinear, load_fp8_model, weight_bytes
from nanoseek.model.moe import RoutedExperts
from nanoseek.model.transformer import DeepseekV3ForCausalLM

MIN_NORMAL = 2.0**-6  # smallest normal e4m3 value; below it the spacing is the subnormal step 2^-9


def _wide_range(*shape, seed=0):
    """Values spanning many binades (so some land in e4m3's subnormals after scaling), plus exact zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * torch.exp2(torch.randint(-12, 4, shape, generator=g).float())
    x[..., ::17] = 0.0
    return x


def _check_bound(x: torch.Tensor, q) -> None:
    """|x - deq(q)| <= max(2^-4 |x|, 2^-10 s) element-wise, s its block's scale.

    e4m3 keeps 3 mantissa bits: for a normal value (|x/s| >= 2^-6) round-to-nearest errs by at most half an ulp,
    2^-4 of the value's binade, i.e. <= 2^-4 |x|. Subnormals are evenly spaced 2^-9 apart, so the absolute error
    is <= 2^-10 in scaled units. amax/s <= 448 (the largest finite value) means no saturation error."""
    s = expand_scale(q.scale, x.shape, q.block)
    err = (x - q.dequantize()).abs()
    bound = torch.maximum(2.0**-4 * x.abs(), 2.0**-10 * s) * (1 + 1e-6)
    assert bool((err <= bound).all()), float((err - bound).max())
    assert bool(((x / s).abs() <= E4M3_MAX * (1 + 1e-6)).all())
    assert bool(((x / s).abs() < MIN_NORMAL).any()), "the test should also exercise subnormals"


@pytest.mark.parametrize("shape,block", [((7, 300), TILE), ((4, 256), TILE), ((200, 300), WEIGHT_BLOCK),
                                         ((256, 128), WEIGHT_BLOCK), ((3, 130, 200), WEIGHT_BLOCK)])
@pytest.mark.parametrize("pow2", [False, True])
def test_roundtrip_within_e4m3_bound(shape, block, pow2):
    x = _wide_range(*shape)
    q = quantize(x, block, pow2_scales=pow2)
    assert q.data.dtype == torch.float8_e4m3fn and q.data.shape == x.shape
    *lead, R, C = shape
    assert q.scale.shape == (*lead, -(-R // block[0]), -(-C // block[1]))
    _check_bound(x, q)
    if pow2:
        assert bool((torch.log2(q.scale) == torch.log2(q.scale).round()).all())
    else:  # scale = amax / 448 exactly, edge blocks included (their padding is zeros)
        b0, b1 = block
        amax = x[..., :b0, -(C % b1 or b1):].abs().amax(dim=(-2, -1))
        torch.testing.assert_close(q.scale[..., 0, -1], amax / E4M3_MAX)


def test_fast_fp8_decoding_is_torchs_cast_for_every_code():
    """The CPU emulation decodes e4m3 by bit placement (fp8_to_float); all 256 codes, NaNs included, must read
    exactly as torch's own cast, and dequantisation (whole blocks or partial edge ones, transposed or not) must
    equal codes x per-element scales."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    got, want = fp8_to_float(codes), codes.float()
    assert bool(((got == want) | (got.isnan() & want.isnan())).all())
    assert int(got.isnan().sum()) == 2
    for shape, block in [((256, 384), WEIGHT_BLOCK), ((300, 200), WEIGHT_BLOCK), ((2, 5, 256), TILE)]:
        q = quantize(_wide_range(*shape), block)
        for qt in (q, q.t()):
            want = qt.data.float() * expand_scale(qt.scale, qt.data.shape, qt.block)
            assert torch.equal(qt.dequantize(), want)


def test_token_tiles_restart_at_expert_boundaries():
    x = _wide_range(300, 40, seed=1)
    counts = torch.tensor([0, 130, 1, 169])
    got = fake_quantize_token_tiles(x, counts)
    # reference: quantise each expert's rows on their own, tiles of 128 tokens along dim 0
    ref = torch.cat([fake_quantize(part.t(), TILE).t() for part in x.split(counts.tolist()) if len(part)])
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert not torch.equal(got, fake_quantize(x.t(), TILE).t())  # tiles crossing experts would differ
    _check_bound(x.t(), quantize(x.t(), TILE))


def test_checkpoint_helpers_agree_with_quantize():
    w = _wide_range(300, 200)
    q, s = quantize_blockwise(w)
    assert s.shape == (3, 2)
    torch.testing.assert_close(dequantize_blockwise(q, s), quantize(w, WEIGHT_BLOCK).dequantize())
    with pytest.raises(ValueError, match="needs"):
        dequantize_blockwise(q, s[:2])


def _rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def test_fp8_linear_matches_float64_reference_of_same_quantisation():
    torch.manual_seed(0)
    lin = torch.nn.Linear(200, 136, bias=False)
    ref_w = lin.weight.detach().clone()
    convert_to_fp8_training(lin)
    assert isinstance(lin, FP8Linear)
    x = torch.randn(3, 50, 200, requires_grad=True)
    dy = torch.randn(3, 50, 136)
    y = lin(x)
    y.backward(dy)
    x2, dy2 = x.detach().reshape(-1, 200), dy.reshape(-1, 136)
    # the same quantised operands, multiplied in float64
    xq, wq = fake_quantize(x2, TILE).double(), fake_quantize(ref_w, WEIGHT_BLOCK).double()
    y_ref = xq @ wq.t()
    dx_ref = fake_quantize(dy2, TILE).double() @ wq  # dgrad: dY tiles along `out`, W's blocks transposed
    dw_ref = fake_quantize(dy2.t(), TILE).double() @ fake_quantize(x2.t(), TILE).double().t()  # tiles along tokens
    assert _rel(y.reshape(-1, 136), y_ref) < 1e-6
    assert _rel(x.grad.reshape(-1, 200), dx_ref) < 1e-6
    assert _rel(lin.weight.grad, dw_ref) < 1e-6
    assert lin.weight.grad.dtype == torch.float32 and lin.weight.dtype == torch.float32
    # and loosely the unquantised float64 linear (e4m3: a few % relative per GEMM)
    xd, wd, dyd = x2.double(), ref_w.double(), dy2.double()
    assert _rel(y.reshape(-1, 136), xd @ wd.t()) < 0.06
    assert _rel(x.grad.reshape(-1, 200), dyd @ wd) < 0.06
    assert _rel(lin.weight.grad, dyd.t() @ xd) < 0.06


def test_fp8_gemms_emit_the_autocast_dtype_on_cpu_as_on_gpu():
    """The recipe's GEMMs accumulate in fp32 and emit bf16; the CPU emulation must round its outputs the same way
    under autocast, or CPU FP8 runs are compared against bf16 with an unfair advantage (fp32 outputs)."""
    torch.manual_seed(0)
    lin = convert_to_fp8_training(torch.nn.Linear(256, 128, bias=False))
    x = torch.randn(4, 256, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and lin.weight.grad.dtype == torch.float32  # master-precision gradients
    assert lin(x).dtype == torch.float32  # without autocast: the input's dtype


def test_fp8_experts_match_float64_reference():
    cfg = smoke().replace(hidden_size=160, moe_intermediate_size=72)
    torch.manual_seed(0)
    ex = RoutedExperts(cfg)
    torch.nn.init.normal_(ex.gate_up_proj, std=0.05)
    torch.nn.init.normal_(ex.down_proj, std=0.05)
    W1, W2 = ex.gate_up_proj.detach().clone(), ex.down_proj.detach().clone()
    convert_to_fp8_training(ex)
    assert isinstance(ex, FP8RoutedExperts)
    x = torch.randn(300, 160)
    ids = torch.randint(0, cfg.n_routed_experts, (300, 2))
    w = torch.rand(300, 2)
    xr = x.clone().requires_grad_(True)
    out = ex(xr, ids, w)
    out.square().sum().backward()

    def reference(quant: bool):
        q = (lambda t, b: fake_quantize(t, b).double()) if quant else (lambda t, b: t.double())
        x64 = x.double().requires_grad_(True)
        w1, w2 = W1.double().requires_grad_(True), W2.double().requires_grad_(True)
        y = torch.zeros(300, 160, dtype=torch.float64)
        for e in range(cfg.n_routed_experts):
            tok, slot = (ids == e).nonzero(as_tuple=True)
            if len(tok) == 0:
                continue
            h = q(x64[tok], TILE) @ q(w1[e], WEIGHT_BLOCK).t()
            g, u = h.chunk(2, dim=-1)
            y = y.index_add(0, tok, (q(F.silu(g) * u, TILE) @ q(w2[e], WEIGHT_BLOCK).t()) * w[tok, slot, None])
        return y, x64, w1, w2

    y_q, *_ = reference(quant=True)
    y_f, x64, w1, w2 = reference(quant=False)
    # the chained second GEMM quantises an fp32 vs a float64 intermediate: a few elements round to a neighbouring
    # e4m3 value, hence 1e-3 here and 1e-6 for the single GEMMs below
    assert _rel(out, y_q) < 1e-3
    assert _rel(out, y_f) < 0.1  # two chained FP8 GEMMs
    y_f.square().sum().backward()  # backward: loosely the unquantised float64 gradients
    assert _rel(xr.grad, x64.grad) < 0.1
    assert _rel(ex.gate_up_proj.grad, w1.grad) < 0.1
    assert _rel(ex.down_proj.grad, w2.grad) < 0.1


def test_convert_to_fp8_training_keeps_parameters_and_trains():
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(smoke())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    convert_to_fp8_training(model)
    assert [id(p) for p in model.parameters()] == params and model.state_dict().keys() == before.keys()
    assert not isinstance(model.lm_head, FP8Linear) and isinstance(model.model.layers[0].mlp.down_proj, FP8Linear)
    ids = torch.randint(0, 512, (2, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(3):
        loss, _ = model.loss(ids[:, :-1], ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    revert_fp8_training(model)
    assert not any(isinstance(m, (FP8Linear, FP8RoutedExperts)) for m in model.modules())
    report = memory_report(model, tokens_per_step=64, probe_tokens=16)
    assert all(f"  {p} " in report for p in ("fp32", "bf16", "fp8"))


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(depth(2, vocab_size=256))  # hidden 128: real 128x128 blocks
    path = tmp_path_factory.mktemp("fp8") / "bf16"
    save_model(model.to(torch.bfloat16), path)
    return path


def test_convert_round_trip(bf16_checkpoint, tmp_path):
    from nanoseek.cli import main

    assert main(["convert", str(bf16_checkpoint), str(tmp_path / "fp8"), "--fp8"]) == 0
    t = read_tensors(tmp_path / "fp8")
    cfg = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert cfg["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                          "weight_block_size": [128, 128]}
    gate = "model.layers.1.mlp.experts.3.gate_proj.weight"
    assert t[gate].dtype == torch.float8_e4m3fn and t[gate + "_scale_inv"].shape == (1, 1)
    assert t["model.layers.0.mlp.up_proj.weight_scale_inv"].shape == (4, 1)  # [512, 128]
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                 "model.norm.weight"):
        assert t[name].dtype == torch.bfloat16 and name + "_scale_inv" not in t
    assert t["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    ids = torch.randint(0, 256, (2, 24))
    ref = load_model(bf16_checkpoint, dtype=torch.float32)
    deq = load_model(tmp_path / "fp8", dtype=torch.float32)
    with torch.no_grad():
        a, b = ref(ids), deq(ids)
    assert _rel(b, a) < 0.2 and float((a.argmax(-1) == b.argmax(-1)).float().mean()) > 0.7
    assert main(["convert", str(tmp_path / "fp8"), str(tmp_path / "back")]) == 0
    back = read_tensors(tmp_path / "back")
    assert not any(k.endswith("_scale_inv") for k in back) and back[gate].dtype == torch.bfloat16
    assert "quantization_config" not in json.loads((tmp_path / "back" / "config.json").read_text())


def test_fp8_weights_in_memory(bf16_checkpoint):
    ref = load_model(bf16_checkpoint, dtype=torch.bfloat16)
    model = load_fp8_model(bf16_checkpoint)  # a bf16 checkpoint is quantised on load
    assert isinstance(model.model.layers[1].self_attn.o_proj, FP8WeightLinear)
    assert isinstance(model.model.layers[1].mlp.experts, FP8WeightExperts)
    assert model.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.float8_e4m3fn
    assert weight_bytes(model) <= 0.55 * weight_bytes(ref)
    model.float()  # a dtype cast moves nothing out of FP8 and keeps the scales fp32
    o = model.model.layers[1].self_attn.o_proj
    assert o.weight.dtype == torch.float8_e4m3fn and o.weight_scale_inv.dtype == torch.float32
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        a, b = ref.float()(ids), model(ids)
    assert _rel(b, a) < 0.25
    from nanoseek.infer.engine import Engine

    outs = Engine(model).generate([[1, 2, 3, 4]], max_tokens=4, temperature=0.0)
    assert len(outs[0].token_ids) == 4


def test_fp8_grouped_gemm_matches_float64_reference_of_same_quantisation():
    from nanoseek.fp8 import _FP8GroupedFunction

    torch.manual_seed(0)
    counts = torch.tensor([0, 150, 3, 147])
    offsets = counts.cumsum(0).to(torch.int32)
    x = torch.randn(300, 160, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(4, 144, 160) * 0.05)
    dy = torch.randn(300, 144)
    _FP8GroupedFunction.apply(x, weight, counts, offsets, False).backward(dy)
    y = _FP8GroupedFunction.apply(x.detach(), weight.detach(), counts, offsets, False)
    dyt, xt = fake_quantize_token_tiles(dy, counts).double(), fake_quantize_token_tiles(x.detach(), counts).double()
    y_ref, dx_ref, dw_ref = torch.zeros(300, 144, dtype=torch.float64), torch.zeros(300, 160, dtype=torch.float64), \
        torch.zeros(4, 144, 160, dtype=torch.float64)
    start = 0
    for e, n in enumerate(counts.tolist()):
        rows = slice(start, start + n)
        wq = fake_quantize(weight.detach()[e], WEIGHT_BLOCK).double()
        y_ref[rows] = fake_quantize(x.detach()[rows], TILE).double() @ wq.t()
        dx_ref[rows] = fake_quantize(dy[rows], TILE).double() @ wq
        dw_ref[e] = dyt[rows].t() @ xt[rows]
        start += n
    assert _rel(y, y_ref) < 1e-6 and _rel(x.grad, dx_ref) < 1e-6 and _rel(weight.grad, dw_ref) < 1e-6


def test_block_scales_handed_per_row_as_tile_scales_are_the_same_numbers():
    """The kernel path's fallback layout for 128x128 weight blocks (torch 2.11's block mode gave wrong products on an
    H100): each block's scale repeated for its 128 rows as 1x128 tile scales dequantises to the same weight."""
    from nanoseek.fp8 import _BLOCK_SCALE_LAYOUTS, _kernel_available

    w = torch.randn(300, 384) * torch.logspace(-2, 2, 300)[:, None]  # rows of very different size: scales differ
    q = quantize(w, WEIGHT_BLOCK)
    tiles = _BLOCK_SCALE_LAYOUTS[-1](q.scale, w.shape[0])  # [K/128, N], as `_scaled_mm` takes 1x128 scales of b
    assert tiles.shape == (3, 300)
    as_tiles = (fp8_to_float(q.data).view(300, 3, 128) * tiles.t()[:, :, None]).view(300, 384)
    assert torch.equal(as_tiles, q.dequantize())
    assert not _kernel_available(torch.device("cpu"))  # the CPU always emulates

