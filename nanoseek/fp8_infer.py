"""FP8 weights at rest and in memory: the official checkpoint format, `nanoseek convert`, and serving.

* `convert_checkpoint(src, dst, fp8=True)` writes DeepSeek's format: every linear weight except the embedding,
  `lm_head` and the router as float8_e4m3fn with an fp32 `weight_scale_inv` [ceil(out/128), ceil(in/128)]
  (routed experts per expert, as the Hub stores them) and `quantization_config` in config.json. `fp8=False`
  writes plain bf16/fp32 (e.g. an FP8 checkpoint back to bf16).
* `load_fp8_model(path)` keeps those weights in FP8 in memory (`FP8WeightLinear`, `FP8WeightExperts`): 1 byte
  per weight plus 4 bytes per 128x128 block, dequantised per matmul (or `_scaled_mm` on Hopper). A bf16 or fp32
  checkpoint is quantised on load. The result is an ordinary model object: `Engine(model)` serves it.

Only `kv_b_proj` stays high precision in memory: the absorbed decode path reads its matrix directly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.checkpoint import (_write_safetensors, atomic_directory, atomic_write_json, load_model, read_tensors,
                                 resolve_model_dir, to_hub_state_dict)
from nanoseek.fp8 import (BLOCK, FP8, TILE, WEIGHT_BLOCK, QTensor, emulation_dtype, fp8_mm, quantize,
                          quantize_blockwise)
from nanoseek.model.moe import RoutedExperts, grouped_linear
from nanoseek.model.transformer import DeepseekV3ForCausalLM

QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "weight_block_size": [BLOCK, BLOCK]}


def is_fp8_hub_weight(name: str, tensor: torch.Tensor) -> bool:
    """Which Hub-layout tensors the official format stores in FP8: every 2-D linear weight except the embedding,
    the output head (and MTP's copies of both) and the router `mlp.gate.weight`."""
    skip = ("embed_tokens.weight", "lm_head.weight", "shared_head.head.weight", ".mlp.gate.weight")
    return name.endswith(".weight") and tensor.dim() == 2 and not name.endswith(skip)


# ============================================================================ FP8 weights in memory
class _KeepFP8:
    """`model.to(dtype)` must move the FP8 payload and its fp32 scales between devices but never cast them (a
    bf16 scale would lose precision; a bf16 weight would double the memory). Engine(model, dtype=...) does this."""

    _fp8_names: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        kept = {}
        for name in self._fp8_names:
            kept[name] = (name in self._parameters, getattr(self, name))
            (self._parameters if kept[name][0] else self._buffers).pop(name)
        try:
            super()._apply(fn, recurse)
        finally:
            for name, (is_param, t) in kept.items():
                device = fn(torch.empty(0, device=t.device)).device
                t = t.data.to(device)
                if is_param:
                    self._parameters[name] = nn.Parameter(t, requires_grad=False)
                else:
                    self._buffers[name] = t
        return self


class FP8WeightLinear(_KeepFP8, nn.Module):
    """A linear layer holding its weight as float8_e4m3fn + `weight_scale_inv` (the checkpoint's own tensors, so
    its state_dict *is* the official format). Activations are quantised per 1x128 tile on the fly
    (`activation_scheme: dynamic`), then the FP8 GEMM runs: tensor cores on Hopper, emulation elsewhere."""

    _fp8_names = ("weight", "weight_scale_inv")

    def __init__(self, weight: torch.Tensor, scale_inv: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.to(FP8), requires_grad=False)
        self.register_buffer("weight_scale_inv", scale_inv.float())
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "FP8WeightLinear":
        q, s = quantize_blockwise(linear.weight.detach())
        return cls(q, s, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        w = QTensor(self.weight, self.weight_scale_inv, WEIGHT_BLOCK)
        y = fp8_mm(quantize(x2, TILE), w, x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 128x128 blocks"


class FP8WeightExperts(_KeepFP8, RoutedExperts):
    """Routed experts with fused FP8 weights. Scales follow the Hub's per-expert matrices: gate_proj and up_proj
    each have their own [ceil(I/128), ceil(D/128)] grid (a fused 128-row block would straddle the two when I is
    not a multiple of 128), stored stacked as `gate_up_proj_scale_inv` [E, 2 * ceil(I/128), ceil(D/128)]."""

    _fp8_names = ("gate_up_proj", "down_proj", "gate_up_proj_scale_inv", "down_proj_scale_inv")

    def _mlp(self, x, counts, gate_up, down):
        # Dequantise all experts of each matrix for one grouped GEMM (there is no FP8 grouped GEMM on CPU);
        # activations are quantised per 1x128 tile, as the FP8 kernel would see them.
        dt, offsets = emulation_dtype(x.device), counts.cumsum(0).to(torch.int32)
        I, nb, s = gate_up.shape[1] // 2, self.gate_up_proj_scale_inv.shape[1] // 2, self.gate_up_proj_scale_inv
        w1 = torch.cat((QTensor(gate_up[:, :I], s[:, :nb], WEIGHT_BLOCK).dequantize(dt),
                        QTensor(gate_up[:, I:], s[:, nb:], WEIGHT_BLOCK).dequantize(dt)), dim=1)
        gate, up = grouped_linear(quantize(x, TILE).dequantize(dt), w1, counts, offsets).chunk(2, dim=-1)
        w2 = QTensor(down, self.down_proj_scale_inv, WEIGHT_BLOCK).dequantize(dt)
        h = quantize(F.silu(gate) * up, TILE).dequantize(dt)
        return grouped_linear(h, w2, counts, offsets).to(x.dtype)


def _to_fp8_experts(m: RoutedExperts, gate_up: QTensor | None = None, down: QTensor | None = None) -> None:
    """Swap a RoutedExperts module to FP8WeightExperts in place (quantising per expert matrix unless given)."""
    I = m.gate_up_proj.shape[1] // 2
    if gate_up is None:
        g, u = quantize(m.gate_up_proj.detach()[:, :I], WEIGHT_BLOCK), quantize(m.gate_up_proj.detach()[:, I:],
                                                                                WEIGHT_BLOCK)
        gate_up = QTensor(torch.cat((g.data, u.data), 1), torch.cat((g.scale, u.scale), 1), WEIGHT_BLOCK)
    if down is None:
        down = quantize(m.down_proj.detach(), WEIGHT_BLOCK)
    del m.gate_up_proj, m.down_proj
    m.__class__ = FP8WeightExperts
    m.gate_up_proj = nn.Parameter(gate_up.data.contiguous(), requires_grad=False)
    m.down_proj = nn.Parameter(down.data.contiguous(), requires_grad=False)
    m.register_buffer("gate_up_proj_scale_inv", gate_up.scale.float().contiguous())
    m.register_buffer("down_proj_scale_inv", down.scale.float().contiguous())


def quantize_model_weights(model: DeepseekV3ForCausalLM, hub_fp8: dict[str, tuple[torch.Tensor, torch.Tensor]]
                           | None = None) -> DeepseekV3ForCausalLM:
    """Replace every FP8-format linear (and the routed experts) by its FP8-in-memory form, in place. `hub_fp8`
    maps Hub names to a checkpoint's own (float8 weight, scale_inv) so they are used bit for bit."""
    hub_fp8 = hub_fp8 or {}
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and is_fp8_hub_weight(name + ".weight", m.weight) and not name.endswith("kv_b_proj"):
            parent_name, _, child = name.rpartition(".")
            key = name + ".weight"
            new = (FP8WeightLinear(*hub_fp8[key], m.bias) if key in hub_fp8 else FP8WeightLinear.from_linear(m))
            setattr(model.get_submodule(parent_name), child, new.to(m.weight.device))
        elif type(m) is RoutedExperts:
            E = m.gate_up_proj.shape[0]
            keys = [[f"{name}.{j}.{p}.weight" for j in range(E)] for p in ("gate_proj", "up_proj", "down_proj")]
            gate_up = down = None
            if all(k in hub_fp8 for ks in keys for k in ks):
                stack = lambda ks, i: torch.stack([hub_fp8[k][i] for k in ks])  # noqa: E731
                gate_up = QTensor(torch.cat((stack(keys[0], 0), stack(keys[1], 0)), 1),
                                  torch.cat((stack(keys[0], 1), stack(keys[1], 1)), 1), WEIGHT_BLOCK)
                down = QTensor(stack(keys[2], 0), stack(keys[2], 1), WEIGHT_BLOCK)
            _to_fp8_experts(m, gate_up, down)
    return model


def load_fp8_model(path: str | Path, dtype: torch.dtype = torch.bfloat16,
                   device: str | torch.device | None = None) -> DeepseekV3ForCausalLM:
    """Load any `deepseek_v3` checkpoint with its linear weights in FP8 in memory (an FP8 checkpoint's own
    weights and scales; a bf16/fp32 one is quantised on load). Everything else (embedding, head, router, norms,
    kv_b_proj) is in `dtype`. Note: the model is first built dequantised, so loading peaks at the bf16 size."""
    directory = resolve_model_dir(path)
    model = load_model(directory, dtype=dtype)
    raw = read_tensors(directory)
    hub_fp8 = {k[: -len("_scale_inv")]: (raw[k[: -len("_scale_inv")]], raw[k]) for k in raw
               if k.endswith(".weight_scale_inv") and k[: -len("_scale_inv")] in raw}
    del raw
    quantize_model_weights(model, hub_fp8)
    model.eval()
    return model.to(device) if device is not None else model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and persistent buffers (FP8 payloads, scales, everything)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    names = {n for n, _ in model.named_parameters()}
    total += sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if n not in names)
    return total


# ============================================================================ nanoseek convert
def fp8_hub_state_dict(tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.bfloat16
                       ) -> dict[str, torch.Tensor]:
    """Hub-layout tensors -> the official FP8 format (FP8 weights + `weight_scale_inv`, the rest in `dtype`,
    `e_score_correction_bias` in fp32)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if is_fp8_hub_weight(name, t):
            out[name], out[name + "_scale_inv"] = quantize_blockwise(t.float())
        elif name.endswith("e_score_correction_bias"):
            out[name] = t.float()
        else:
            out[name] = t.to(dtype)
    return out


def convert_checkpoint(src: str | Path, dst: str | Path, fp8: bool = False, dtype: torch.dtype = torch.bfloat16,
                       max_shard_bytes: int = 5 * 2**30) -> Path:
    """Rewrite a `deepseek_v3` checkpoint: to DeepSeek's FP8 format (`fp8=True`), or to plain `dtype` weights
    (an FP8 checkpoint is dequantised). Tokenizer and generation files are copied; the write is atomic."""
    src = resolve_model_dir(src)
    dst = Path(dst)
    if dst.resolve() == src.resolve():
        raise ValueError(f"convert writes a new directory; {dst} is the source itself, pick another DST")
    model = load_model(src, dtype=torch.float32)  # FP8 sources are dequantised here
    tensors = to_hub_state_dict(model)
    tensors = fp8_hub_state_dict(tensors, dtype) if fp8 else {
        k: v.float() if k.endswith("e_score_correction_bias") else v.to(dtype) for k, v in tensors.items()}
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(model.config.to_hf_dict())
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    cfg.pop("quantization_config", None)
    if fp8:
        cfg["quantization_config"] = dict(QUANTIZATION_CONFIG)
    with atomic_directory(dst) as tmp:
        atomic_write_json(tmp / "config.json", cfg)
        for f in src.iterdir():  # tokenizer, generation config, chat template, README: everything but weights
            if f.is_file() and f.name != "config.json" and not f.name.endswith(".safetensors") \
                    and f.name != "model.safetensors.index.json" and not f.name.startswith("."):
                shutil.copy2(f, tmp / f.name)
        _write_safetensors(tensors, tmp, max_shard_bytes)
    return dst
