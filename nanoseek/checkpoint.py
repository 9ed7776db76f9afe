"""Checkpoints in the Hugging Face `deepseek_v3` layout, and atomic file writes.

On disk: `config.json`, `model.safetensors` (or shards + `model.safetensors.index.json`), `generation_config.json`,
and the tokenizer files when there is a tokenizer. Keys are the Hub's: routed experts per expert
(`mlp.experts.{j}.gate_proj.weight`), MTP module k at `model.layers.{L + k}.*` with copies of the shared
embedding and head (as DeepSeek's own checkpoints carry them). Loading also accepts transformers v5's fused
experts and DeepSeek's official FP8 weights (dequantised), and a checkpoint without MTP weights (transformers
writes none) loads with MTP left out and a warning.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanoseek.atomic import atomic_directory, atomic_write_json, atomic_write_text  # noqa: F401 (re-exported)
from nanoseek.config import ModelConfig
from nanoseek.fp8 import dequantize_blockwise
from nanoseek.model.transformer import DeepseekV3ForCausalLM

SAFETENSORS_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


# ============================================================================ state dict <-> Hub keys
def to_hub_state_dict(model: DeepseekV3ForCausalLM) -> dict[str, torch.Tensor]:
    """Our state dict in the Hub's key layout: fused experts split per expert, MTP with shared embed/head copies."""
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name.endswith(".mlp.experts.gate_up_proj"):
            prefix, half = name[: -len(".gate_up_proj")], t.shape[1] // 2
            for j in range(t.shape[0]):
                out[f"{prefix}.{j}.gate_proj.weight"] = t[j, :half]
                out[f"{prefix}.{j}.up_proj.weight"] = t[j, half:]
        elif name.endswith(".mlp.experts.down_proj"):
            prefix = name[: -len(".down_proj")]
            for j in range(t.shape[0]):
                out[f"{prefix}.{j}.down_proj.weight"] = t[j]
        else:
            out[name] = t
    for mtp in range(len(model.mtp_modules)):
        i = model.config.num_hidden_layers + mtp
        out[f"model.layers.{i}.embed_tokens.weight"] = out["model.embed_tokens.weight"]
        out[f"model.layers.{i}.shared_head.head.weight"] = out["lm_head.weight"]
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def from_hub_state_dict(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Hub / v5-fused / FP8 keys -> our state dict keys. Per-expert tensors are stacked into fused ones."""
    tensors = dict(tensors)
    for name in [k for k in tensors if k.endswith(".weight_scale_inv")]:
        weight_name = name[: -len("_scale_inv")]
        if weight_name in tensors:
            tensors[weight_name] = dequantize_blockwise(tensors[weight_name], tensors.pop(name))
        else:
            tensors.pop(name)
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, t in tensors.items():
        m = _EXPERT_KEY.match(name)
        if m:
            experts.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = t
        elif re.search(r"\.layers\.\d+\.(embed_tokens|shared_head\.head)\.weight$", name):
            continue  # MTP's copies of the shared embedding and head
        else:
            out[name] = t  # includes v5 fused `mlp.experts.gate_up_proj` / `down_proj`, already our layout
    for prefix, by_index in experts.items():
        E = config.n_routed_experts
        missing = [j for j in range(E) if j not in by_index or len(by_index[j]) != 3]
        if missing:
            raise ValueError(f"checkpoint is missing weights of expert {missing[0]} in {prefix} "
                             f"(config says n_routed_experts={E})")
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat((by_index[j]["gate_proj"], by_index[j]["up_proj"]), 0) for j in range(E)])
        out[f"{prefix}.down_proj"] = torch.stack([by_index[j]["down_proj"] for j in range(E)])
    return out


# ============================================================================ save / load
def save_model(model: DeepseekV3ForCausalLM, path: str | Path, tokenizer=None,
               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, generation: dict | None = None) -> Path:
    """Write `model` (and `tokenizer`, anything with `.save(dir)`) in Hugging Face layout, atomically."""
    path = Path(path)
    tensors = to_hub_state_dict(model)
    dtype = next(model.parameters()).dtype
    with atomic_directory(path) as tmp:
        cfg = model.config.to_hf_dict()
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
        atomic_write_json(tmp / "config.json", cfg)
        gen = {"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id,
               "do_sample": True, "temperature": 0.6, "top_p": 0.95, **(generation or {})}
        atomic_write_json(tmp / "generation_config.json", gen)
        _write_safetensors(tensors, tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return path


def _write_safetensors(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    # safetensors refuses tensors that share memory; the MTP copies of embed/head do, so clone per shard.
    shards = [{k: v.clone() for k, v in s.items()} for s in shards]
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata=meta)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname), metadata=meta)
        for k, v in shard.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    atomic_write_json(directory / SAFETENSORS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory, or a run directory (meaning its final `model/`)."""
    path = Path(path)
    if (path / "model" / "config.json").exists() and not (path / "config.json").exists():
        return path / "model"
    if (path / "model" / "config.json").exists() and not _weight_files(path):
        return path / "model"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a model directory (config.json + *.safetensors) "
                                f"or a run directory")
    if not path.is_dir() or not (path / "config.json").exists():
        raise NotADirectoryError(f"{path} is not a model directory: it has no config.json")
    return path


def _weight_files(directory: Path) -> list[Path]:
    index = directory / SAFETENSORS_INDEX
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / n for n in names]
    return sorted(directory.glob("*.safetensors"))


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    files = _weight_files(directory)
    if not files:
        raise FileNotFoundError(f"{directory} has a config.json but no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"{f.name} is listed in {SAFETENSORS_INDEX} but missing from {directory}")
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                tensors[k] = fh.get_tensor(k)
    return tensors


def load_model(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
               strict: bool = True) -> DeepseekV3ForCausalLM:
    """Load any `deepseek_v3` directory written by nanoseek, transformers or DeepSeek (FP8 dequantised)."""
    directory = resolve_model_dir(path)
    config = ModelConfig.load(directory)
    tensors = from_hub_state_dict(read_tensors(directory), config)
    L = config.num_hidden_layers
    mtp_present = [k for k in range(config.num_nextn_predict_layers)
                   if any(n.startswith(f"model.layers.{L + k}.") for n in tensors)]
    if len(mtp_present) < config.num_nextn_predict_layers:
        warnings.warn(f"{directory} names {config.num_nextn_predict_layers} MTP module(s) in config.json but holds "
                      f"weights for {len(mtp_present)} (transformers does not save them); loading without MTP",
                      stacklevel=2)
        config = config.replace(num_nextn_predict_layers=len(mtp_present))
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config)
    expected = model.state_dict()
    for name, ref in expected.items():
        if name not in tensors:
            raise ValueError(f"checkpoint {directory} has no tensor {name} (shape {list(ref.shape)}) that its "
                             f"config.json requires")
        if tuple(tensors[name].shape) != tuple(ref.shape):
            raise ValueError(f"checkpoint tensor {name} has shape {list(tensors[name].shape)} but config.json "
                             f"implies {list(ref.shape)}")
    extra = sorted(set(tensors) - set(expected))
    if extra and strict:
        warnings.warn(f"ignoring {len(extra)} tensor(s) the config does not use, e.g. {extra[0]}", stacklevel=2)
    target = dtype or _stored_dtype(tensors)
    state = {n: tensors[n].to(torch.float32 if n.endswith("e_score_correction_bias") else target)
             for n in expected}
    model.load_state_dict(state, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(config)  # non-persistent buffer: rebuild off meta
    for m in model.moe_layers():
        m.load_counts = torch.zeros(config.n_routed_experts)
    model.eval()
    return model.to(device) if device is not None else model


def _stored_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        if k in tensors and tensors[k].is_floating_point():
            return tensors[k].dtype
    return torch.float32
