"""Model configuration: Hugging Face `DeepseekV3Config` field names, plus nanoseek's training knobs.

A `ModelConfig` is plain data. `to_hf_dict()` writes a `config.json` that `transformers` (v4 and v5) reads as a
`deepseek_v3` config; `from_hf_dict()` reads any such file, ignoring keys we do not use. Presets are functions
of one dial (depth) plus a few named shapes: `smoke` for tests, `tiny` for the CPU speedrun, and the published
DeepSeek-V3 (671B) and 16B `deepseek_v3`-architecture shapes for costing and loading.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# nanoseek's own knobs: not part of the Hugging Face config, stored under this key in config.json so that a run
# can be re-created from the file alone. transformers keeps unknown keys as plain attributes and ignores them.
NANOSEEK_KEY = "nanoseek"


@dataclass
class ModelConfig:
    # --- Hugging Face DeepseekV3Config fields (same names, same meanings) ---
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense FFN width (layers < first_k_dense_replace)
    moe_intermediate_size: int = 2048  # width of one routed (and one shared) expert
    num_hidden_layers: int = 61  # MTP modules not included
    num_attention_heads: int = 128
    num_key_value_heads: int = 128  # MLA: every head has its own K/V after up-projection
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536  # None: a single q_proj instead of q_a_proj -> norm -> q_b_proj
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    topk_method: str = "noaux_tc"
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    pad_token_id: int | None = None
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"type": "yarn", "factor", "beta_fast", "beta_slow", "mscale", ...}
    rope_interleave: bool = True
    attention_bias: bool = False
    attention_dropout: float = 0.0
    num_nextn_predict_layers: int = 1  # MTP depth D

    # --- nanoseek training knobs (written under config.json["nanoseek"]) ---
    mtp_loss_weight: float = 0.3  # lambda in L = L_main + lambda/D * sum_k L_mtp_k  (V3: 0.3, later 0.1)
    bias_update_speed: float = 0.001  # gamma of aux-loss-free balancing; 0 turns balancing off
    seq_aux_loss_alpha: float = 0.0  # sequence-wise balance loss alpha (V3: 1e-4); 0 = off
    router_z_loss_coeff: float = 0.0  # router z-loss coefficient (Megatron suggests 1e-3); 0 = off

    # ---------------------------------------------------------------- derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def latent_cache_dim(self) -> int:
        """Values cached per token per layer by absorbed MLA: the normalised latent and the roped key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times mscale^2 when YaRN carries `mscale_all_dim` (as Hugging Face does)."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling or {}
        if rope_type(rs) == "yarn" and rs.get("mscale_all_dim"):
            m = yarn_mscale(float(rs["factor"]), float(rs["mscale_all_dim"]))
            scale *= m * m
        return scale

    # ---------------------------------------------------------------- validation
    def validate(self) -> "ModelConfig":
        """Raise ValueError with one sentence naming the bad field and the fix."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim must be even for RoPE pairs, got {self.qk_rope_head_dim}")
        need(self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank must be positive or null")
        if self.n_routed_experts > 0:
            need(1 <= self.num_experts_per_tok <= self.n_routed_experts,
                 f"num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and n_routed_experts ({self.n_routed_experts})")
            need(self.n_group >= 1 and self.n_routed_experts % self.n_group == 0,
                 f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({self.n_group})")
            need(1 <= self.topk_group <= self.n_group,
                 f"topk_group ({self.topk_group}) must be between 1 and n_group ({self.n_group})")
            per_group = self.n_routed_experts // self.n_group
            need(self.n_group == 1 or per_group >= 2,
                 f"group-limited routing scores a group by its top-2 experts, so each of the {self.n_group} groups needs >= 2 experts")
            need(self.topk_group * per_group >= self.num_experts_per_tok,
                 f"topk_group ({self.topk_group}) x experts per group ({per_group}) must cover num_experts_per_tok ({self.num_experts_per_tok})")
            need(self.moe_intermediate_size > 0, "moe_intermediate_size must be positive when there are routed experts")
        need(self.scoring_func == "sigmoid", f"scoring_func {self.scoring_func!r} is not supported; DeepSeek-V3 uses 'sigmoid'")
        need(self.hidden_act == "silu", f"hidden_act {self.hidden_act!r} is not supported; DeepSeek-V3 uses 'silu'")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers must be >= 0")
        rs = self.rope_scaling or {}
        need(rope_type(rs) in ("default", "yarn"), f"rope_scaling type {rope_type(rs)!r} is not supported; use 'yarn' or null")
        if rope_type(rs) == "yarn":
            need("factor" in rs and "original_max_position_embeddings" in rs,
                 "yarn rope_scaling needs 'factor' and 'original_max_position_embeddings'")
        return self

    # ---------------------------------------------------------------- (de)serialisation
    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json dict that transformers v4 (`rope_scaling`) and v5 (`rope_parameters`) both read."""
        own = {f.name for f in dataclasses.fields(self) if f.name in _NANOSEEK_FIELDS}
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in own}
        d["architectures"] = ["DeepseekV3ForCausalLM"]
        d["model_type"] = "deepseek_v3"
        d["qk_head_dim"] = self.qk_head_dim
        d["head_dim"] = self.qk_rope_head_dim
        d["rope_parameters"] = {"rope_type": rope_type(self.rope_scaling or {}), "rope_theta": self.rope_theta,
                                **{k: v for k, v in (self.rope_scaling or {}).items() if k not in ("type", "rope_type")}}
        d[NANOSEEK_KEY] = {k: getattr(self, k) for k in sorted(own)}
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Read a deepseek_v3 config.json (v4 or v5 style). Unknown keys are ignored; missing ones take defaults."""
        model_type = d.get("model_type", "deepseek_v3")
        if model_type not in ("deepseek_v3", "kimi_k2"):
            raise ValueError(f"config.json has model_type {model_type!r}; nanoseek loads 'deepseek_v3' models")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw.update({k: v for k, v in d.get(NANOSEEK_KEY, {}).items() if k in names})
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            kw["num_nextn_predict_layers"] = d["num_mtp_layers"]
        rp = d.get("rope_parameters")
        if rp and "rope_scaling" not in d:  # v5 layout: theta and scaling live together
            kw["rope_theta"] = rp.get("rope_theta", kw.get("rope_theta", 10000.0))
            extra = {k: v for k, v in rp.items() if k not in ("rope_theta", "rope_type")}
            kw["rope_scaling"] = {"type": rp.get("rope_type", "default"), **extra} if rope_type(rp) != "default" else None
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        for k in ("n_group", "topk_group"):
            if kw.get(k) is None:
                kw.pop(k, None) if k != "n_group" else kw.update(n_group=1)
        if kw.get("topk_group") is None:
            kw["topk_group"] = kw.get("n_group", 1)
        return cls(**kw).validate()

    def save(self, path: str | Path) -> None:
        from nanoseek.atomic import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"no config.json at {path}; point at a model directory or a config file")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); fix or regenerate it") from None
        return cls.from_hf_dict(d)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes).validate()

    def with_overrides(self, assignments: list[str]) -> "ModelConfig":
        """Apply `KEY=VALUE` strings (the CLI's --set), parsing VALUE as JSON where it can."""
        names = {f.name: f for f in dataclasses.fields(self)}
        changes: dict[str, Any] = {}
        for item in assignments:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ValueError(f"--set {item!r} is not KEY=VALUE; write e.g. --set hidden_size=256")
            if key not in names:
                raise ValueError(f"--set {key}: ModelConfig has no field {key!r}")
            try:
                changes[key] = json.loads(raw)
            except json.JSONDecodeError:
                changes[key] = raw
        return self.replace(**changes)


_NANOSEEK_FIELDS = ("mtp_loss_weight", "bias_update_speed", "seq_aux_loss_alpha", "router_z_loss_coeff")


def rope_type(rope_scaling: dict) -> str:
    return rope_scaling.get("rope_type") or rope_scaling.get("type") or "default"


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature term: 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


# ==================================================================== presets
def depth(d: int, vocab_size: int = 2048) -> ModelConfig:
    """The nanoseek family, one dial: width, heads, latent ranks and experts all follow the depth.

    Aspect ratio 64 (hidden = 64 * depth), head dims 32/16/32 for nope/rope/v, 8 routed experts (top-2, one
    shared) up to depth 8 and then 16/32/64 with group-limited routing, one dense layer first, one MTP module.
    The balancing bias moves 10x faster than DeepSeek-V3's 0.001: these runs last hundreds of steps, not
    hundreds of thousands (measured on `tiny`, 136 steps: max/mean expert load 1.25 at 0.01, 3.55 with none).
    """
    if d < 1:
        raise ValueError(f"depth must be >= 1, got {d}")
    hidden = 64 * d
    heads = max(2, d)
    experts = 8 if d <= 8 else 16 if d <= 16 else 32 if d <= 24 else 64
    groups = 1 if experts <= 8 else 4
    return ModelConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        moe_intermediate_size=hidden // 2,
        num_hidden_layers=d,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        n_shared_experts=1,
        n_routed_experts=experts,
        routed_scaling_factor=2.5 if experts > 8 else 1.0,
        kv_lora_rank=max(32, hidden // 3 // 16 * 16),
        q_lora_rank=max(32, hidden // 2 // 16 * 16),
        qk_rope_head_dim=16,
        v_head_dim=32,
        qk_nope_head_dim=32,
        n_group=groups,
        topk_group=max(1, groups // 2),
        num_experts_per_tok=2 if experts <= 16 else 4,
        first_k_dense_replace=1,
        max_position_embeddings=1024,
        initializer_range=0.02,
        num_nextn_predict_layers=1,
        bias_update_speed=0.01,
    ).validate()


def smoke() -> ModelConfig:
    """For tests: every feature on (q LoRA, group-limited routing, YaRN, MTP), built and run in milliseconds."""
    return ModelConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        n_shared_experts=1, n_routed_experts=8, routed_scaling_factor=2.5,
        kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8,
        n_group=4, topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1,
        max_position_embeddings=256, num_nextn_predict_layers=1,
    ).validate()


def tiny() -> ModelConfig:
    """The CPU speedrun model: depth 6, about 16M parameters (8 routed experts, 3.6M active per token).

    Its 512-token vocabulary fits the built-in task corpus (whose BPE saturates near 480 tokens); for your own
    text pass e.g. `--set vocab_size=8192`."""
    return depth(6, vocab_size=512)


def deepseek_v3_671b() -> ModelConfig:
    """DeepSeek-V3 / R1 as published on the Hub (config.json of deepseek-ai/DeepSeek-V3)."""
    return ModelConfig(
        max_position_embeddings=163840,
        rope_scaling={"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                      "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096},
        mtp_loss_weight=0.3,
        seq_aux_loss_alpha=0.0001,
    ).validate()


def deepseek_v3_16b() -> ModelConfig:
    """A 16B-total / 3B-active `deepseek_v3` model: the shape of Moonlight-16B-A3B (64 experts, top-6)."""
    return ModelConfig(
        vocab_size=163840, hidden_size=2048, intermediate_size=11264, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
        n_shared_experts=2, n_routed_experts=64, routed_scaling_factor=2.446,
        kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128,
        n_group=1, topk_group=1, num_experts_per_tok=6, first_k_dense_replace=1,
        max_position_embeddings=8192, rope_theta=50000.0, num_nextn_predict_layers=0,
    ).validate()


PRESETS = {
    "smoke": smoke,
    "tiny": tiny,
    "deepseek-v3": deepseek_v3_671b,
    "deepseek-v3-16b": deepseek_v3_16b,
}


def preset(name: str) -> ModelConfig:
    """A named preset, or `dN` for the depth family (e.g. `d12`)."""
    if name in PRESETS:
        return PRESETS[name]()
    if name.startswith("d") and name[1:].isdigit():
        return depth(int(name[1:]))
    known = ", ".join(list(PRESETS) + ["d<N>"])
    raise ValueError(f"unknown preset {name!r}; choose one of: {known}")


class presets:  # noqa: N801  - namespace so users can write `presets.tiny()` as in the public surface
    smoke = staticmethod(smoke)
    tiny = staticmethod(tiny)
    depth = staticmethod(depth)
    deepseek_v3_671b = staticmethod(deepseek_v3_671b)
    deepseek_v3_16b = staticmethod(deepseek_v3_16b)
    get = staticmethod(preset)
    names = staticmethod(lambda: list(PRESETS))
