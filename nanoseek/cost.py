"""What a model costs: parameters, FLOPs per token, devices, receipts, and DeepSeek's published tables.

Read top to bottom:
1. `param_counts` and `flops_per_token` from a `ModelConfig` (analytic, no model is built).
2. A device catalogue (peak dense TFLOP/s and a default price per hour), overridable from a user file; the
   `cpu` entry is this machine, measured by a short timed matmul.
3. `Receipt`: what one stage cost (device-hours, dollars, MFU), written atomically as receipt.json.
4. DeepSeek's published figures (V3 Table 1, R1's stages, s1, TinyZero, API prices) for `nanoseek cost --published`.

Conventions (the usual MFU ones, so our numbers compare with other people's):
- A matmul with a weight of W elements costs 2*W FLOPs per token forward; training is 3x forward (the backward
  pass computes gradients for both inputs and weights). Activation recomputation is NOT counted: MFU measures
  useful work, not work done.
- Elementwise work (norms, activations, softmax, RoPE, router top-k) is left out: it is < 1% at every size we
  cost and is memory-bound anyway.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek.atomic import atomic_write_json
from nanoseek.config import ModelConfig, deepseek_v3_671b, rope_type

# ==================================================================== 1. parameters and FLOPs


def _attention(cfg: ModelConfig) -> tuple[int, int]:
    """One MLA block's (matmul weights, other parameters), exactly as `DeepseekV3Attention` holds them."""
    h, H = cfg.hidden_size, cfg.num_attention_heads
    bias = cfg.attention_bias
    if cfg.q_lora_rank is None:  # one dense q_proj: hidden -> heads * (nope + rope)
        q_mm, q_other = h * H * cfg.qk_head_dim, 0
    else:  # q_a_proj -> q_a_layernorm -> q_b_proj (the query goes through a low-rank bottleneck too)
        r = cfg.q_lora_rank
        q_mm, q_other = h * r + r * H * cfg.qk_head_dim, r + (r if bias else 0)
    kv_a = h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)  # latent + the one shared roped key
    kv_b = cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)  # latent -> per-head K_nope and V
    o = H * cfg.v_head_dim * h
    other = q_other + cfg.kv_lora_rank  # kv_a_layernorm
    if bias:
        other += cfg.kv_lora_rank + cfg.qk_rope_head_dim + h  # kv_a_proj and o_proj biases
    return q_mm + kv_a + kv_b + o, other


def _layer(cfg: ModelConfig, moe: bool) -> dict[str, int]:
    """One decoder layer: total parameters, parameters a token touches, and the matmul part of the latter."""
    h = cfg.hidden_size
    attn_mm, attn_other = _attention(cfg)
    norms = 2 * h + attn_other  # input_layernorm, post_attention_layernorm (+ MLA's inner norms and biases)
    if moe:
        expert = 3 * h * cfg.moe_intermediate_size  # gate, up, down of one SwiGLU expert
        router = cfg.n_routed_experts * h  # gate.weight; the correction bias is a buffer, not a parameter
        shared = cfg.n_shared_experts * expert  # one MLP of width n_shared * moe_inter, seen by every token
        total_ffn = cfg.n_routed_experts * expert + shared + router
        active_ffn = cfg.num_experts_per_tok * expert + shared + router  # the router scores every expert
    else:
        total_ffn = active_ffn = 3 * h * cfg.intermediate_size
    return {
        "total": attn_mm + norms + total_ffn,
        "active": attn_mm + norms + active_ffn,
        "matmul": attn_mm + active_ffn,
    }


def _mtp_module(cfg: ModelConfig) -> dict[str, int]:
    """One MTP module: enorm, hnorm, eh_proj [h, 2h], shared_head.norm, and one full decoder layer.

    Its embedding and head are the main model's (no parameters here), but the head is applied again, so the
    head's matmul is added to `matmul` (FLOPs) though not to `total` (parameters).
    """
    h = cfg.hidden_size
    layer = _layer(cfg, moe=cfg.n_routed_experts > 0)
    eh_proj = h * 2 * h
    return {
        "total": layer["total"] + eh_proj + 3 * h,
        "active": layer["active"] + eh_proj + 3 * h,
        "matmul": layer["matmul"] + eh_proj + cfg.vocab_size * h,
    }


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts by component, plus the totals people quote ("671B total, 37B active").

    `total` equals `sum(p.numel() for p in model.parameters())` of our model (MTP included); `main_total` leaves the
    MTP modules out, which is what transformers builds and what "671B" means. `active` is what one token touches
    in the main model (embedding row and head included, as DeepSeek counts "37B"); `matmul_active` drops the
    embedding lookup and the norms, leaving the weights that cost 2 FLOPs each per token forward.
    """
    h, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    layers = [_layer(cfg, cfg.is_moe_layer(i)) for i in range(L)]
    moe_layers = cfg.num_moe_layers
    expert = 3 * h * cfg.moe_intermediate_size
    attn_mm, attn_other = _attention(cfg)
    mtp = _mtp_module(cfg)
    D = cfg.num_nextn_predict_layers
    head = 0 if cfg.tie_word_embeddings else V * h

    c = {
        "embedding": V * h,
        "lm_head": head,
        "attention": L * (attn_mm + attn_other),
        "dense_mlp": (L - moe_layers) * 3 * h * cfg.intermediate_size,
        "routed_experts": moe_layers * cfg.n_routed_experts * expert,
        "shared_experts": moe_layers * cfg.n_shared_experts * expert,
        "router": moe_layers * cfg.n_routed_experts * h,
        "norms": L * 2 * h + h,  # two per block + the final norm
        "mtp": D * mtp["total"],
    }
    c["total"] = sum(c.values())
    c["main_total"] = c["total"] - c["mtp"]
    c["active"] = V * h + head + sum(x["active"] for x in layers) + h
    c["matmul_active"] = V * h + sum(x["matmul"] for x in layers)  # head matmul happens even when tied
    c["mtp_active"] = D * mtp["active"]
    c["mtp_matmul_active"] = D * mtp["matmul"]
    return c


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token per layer for the score (QK^T) and value (PV) matmuls.

    Causal attention: a query at position t sees t keys, so on average seq_len/2. (PaLM/nanochat's 12*L*H*Q*T
    counts the full square; flash kernels skip the masked half, so we count what runs.) MLA attends with
    qk_head_dim = nope + rope (192) for scores and v_head_dim (128) for values, per head.
    """
    ctx = seq_len / 2
    return 2.0 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * ctx


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True, include_mtp: bool = True) -> float:
    """Model FLOPs per token: 2 x active matmul weights + attention, x3 when training.

    Only the experts a token is routed to count (num_experts_per_tok of n_routed_experts), which is why a 671B
    MoE costs about what a 37B dense model does. Each MTP module adds its own layer, its eh_proj, and one more
    pass through the shared head. The embedding lookup is a gather, not a matmul, and costs nothing here.
    """
    if seq_len < 1:
        raise ValueError(f"sequence length must be positive, got {seq_len}")
    pc = param_counts(cfg)
    attn = attention_flops_per_token(cfg, seq_len)
    forward = 2.0 * pc["matmul_active"] + cfg.num_hidden_layers * attn
    if include_mtp:
        forward += 2.0 * pc["mtp_matmul_active"] + cfg.num_nextn_predict_layers * attn
    return 3.0 * forward if training else forward


def default_seq_len(cfg: ModelConfig) -> int:
    """The pretraining context: YaRN's original length when the config carries one (4096 for V3), else max."""
    rs = cfg.rope_scaling or {}
    if rope_type(rs) == "yarn" and rs.get("original_max_position_embeddings"):
        return int(rs["original_max_position_embeddings"])
    return cfg.max_position_embeddings


# ==================================================================== 2. devices

# Peak DENSE tensor-core throughput per device (vendors quote "with sparsity" figures at 2x; we halve them).
# Sources: NVIDIA H100 datasheet (SXM5: BF16 989.4, FP8 1,978.9 TFLOPS dense); H800 SXM is an H100 SXM with
# cut NVLink/FP64, same tensor cores (DeepSeek-V3 §3); H200 datasheet (same figures as H100 SXM); A100 datasheet
# (BF16 312, no FP8 tensor cores); HGX B200 datasheet (per GPU: FP8 9 PF sparse -> 4.5 dense, BF16 2.25 dense);
# Ada whitepaper (RTX 4090, FP32 accumulate: BF16 165.2, FP8 330.3 dense).
# Prices are defaults for a stated assumption, not quotes: H800 $2 is the rental price DeepSeek-V3 used; H100 $3
# and A100 $1.79 are nanochat's rates (REFERENCE §7.1); H200 $3.50, B200 $5.00 and RTX 4090 $0.40 are our
# round on-demand guesses (2025). Your own CPU is $0. Override any of them in a devices file.
_GPUS = [  # name, dense bf16 TFLOP/s, dense fp8 TFLOP/s (None: no FP8 tensor cores), default $/hour, source
    ("H800", 989.4, 1978.9, 2.00, "H100 SXM tensor cores; $2/h as in DeepSeek-V3 §1"),
    ("H100", 989.4, 1978.9, 3.00, "NVIDIA H100 SXM datasheet; $3/h as nanochat"),
    ("H200", 989.4, 1978.9, 3.50, "NVIDIA H200 datasheet; $3.50/h assumed"),
    ("A100", 312.0, None, 1.79, "NVIDIA A100 80GB datasheet; $1.79/h as nanochat"),
    ("B200", 2250.0, 4500.0, 5.00, "NVIDIA HGX B200 datasheet; $5/h assumed"),
    ("RTX 4090", 165.2, 330.3, 0.40, "NVIDIA Ada whitepaper (FP32 accumulate); $0.40/h assumed"),
]
_ALIASES = {"h100sxm": "h100", "h800sxm": "h800", "h200sxm": "h200", "a10080gb": "a100", "a100sxm": "a100",
            "4090": "rtx4090", "geforcertx4090": "rtx4090"}


def _key(name: str) -> str:
    k = re.sub(r"[^a-z0-9]", "", name.lower())
    return _ALIASES.get(k, k)


_CATALOGUE: dict[str, dict[str, Any]] = {
    _key(n): dict(name=n, bf16_tflops=b, fp8_tflops=f, price_per_hour=p, source=s) for n, b, f, p, s in _GPUS}
_CATALOGUE["cpu"] = dict(name="cpu", bf16_tflops=None, fp8_tflops=None, fp32_tflops=None, price_per_hour=0.0,
                         source="measured here by a timed torch.matmul; your own machine costs $0")
_FIELDS = {"name": str, "bf16_tflops": float, "fp8_tflops": float, "fp32_tflops": float,
           "price_per_hour": float, "source": str}
PRECISIONS = ("bf16", "fp8", "fp32")


@dataclass(frozen=True)
class Device:
    name: str
    bf16_tflops: float | None
    fp8_tflops: float | None
    price_per_hour: float
    source: str = ""
    fp32_tflops: float | None = None

    def peak_flops(self, precision: str = "bf16") -> float:
        """Peak FLOP/s at a precision; an error, not a guess, when the device has no such figure."""
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
        tflops = getattr(self, f"{precision}_tflops")
        if not tflops:
            raise ValueError(f"device {self.name} has no {precision} peak in the catalogue; "
                             f"use another precision or add {precision}_tflops for it in a devices file")
        return tflops * 1e12


def default_devices_file() -> Path | None:
    """`$XDG_CONFIG_HOME/nanoseek/devices.json` (or .toml), defaulting to ~/.config; None when absent."""
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "nanoseek"
    for name in ("devices.json", "devices.toml"):
        if (base / name).is_file():
            return base / name
    return None


def _read_devices_file(path: Path) -> dict[str, dict[str, Any]]:
    """Parse and validate a user devices file: {name: {bf16_tflops, fp8_tflops, price_per_hour, ...}}."""
    if not path.is_file():
        raise FileNotFoundError(f"devices file {path} does not exist; check the path given to --devices")
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"devices file {path} does not parse ({e}); it should map device names to fields") from None
    if not isinstance(data, dict):
        raise ValueError(f"devices file {path} must be an object mapping device names to fields")
    out = {}
    for dev, fields in data.items():
        if not isinstance(fields, dict):
            raise ValueError(f"devices file {path}: entry {dev!r} must be an object like "
                             '{"bf16_tflops": 989, "price_per_hour": 2.5}')
        for k, v in fields.items():
            if k not in _FIELDS:
                raise ValueError(f"devices file {path}: {dev}.{k} is not a device field; "
                                 f"use {', '.join(f for f in _FIELDS)}")
            if _FIELDS[k] is float and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0
                                        or not math.isfinite(v)):
                raise ValueError(f"devices file {path}: {dev}.{k} must be a non-negative number, got {v!r}")
            if _FIELDS[k] is str and not isinstance(v, str):
                raise ValueError(f"devices file {path}: {dev}.{k} must be a string, got {v!r}")
        if _key(dev) not in _CATALOGUE and ("price_per_hour" not in fields or not fields.get("bf16_tflops")):
            raise ValueError(f"devices file {path}: new device {dev!r} needs at least bf16_tflops and price_per_hour")
        out[_key(dev)] = {"name": dev, **fields} if _key(dev) not in _CATALOGUE else dict(fields)
    return out


def _merged(devices_file: str | Path | None) -> dict[str, dict[str, Any]]:
    """Raw catalogue fields: built-ins, then the default user file, then `devices_file`, field by field."""
    table = {k: dict(v) for k, v in _CATALOGUE.items()}
    for p in (default_devices_file(), Path(devices_file) if devices_file else None):
        if p is not None:
            for k, fields in _read_devices_file(p).items():
                table.setdefault(k, {"fp8_tflops": None, "source": f"from {p}"}).update(fields)
    return table


def _build_device(key: str, d: dict[str, Any]) -> Device:
    # The cpu peak is measured (once per process) only if no file pinned one, so a pinned figure keeps
    # receipts reproducible across machines and runs.
    if key == "cpu" and not d.get("bf16_tflops") and not d.get("fp32_tflops"):
        peak = measure_cpu_peak()
        d = {**d, "bf16_tflops": peak["bf16"] / 1e12, "fp32_tflops": peak["fp32"] / 1e12}
    return Device(**{k: d.get(k) for k in ("name", "bf16_tflops", "fp8_tflops", "fp32_tflops", "source")},
                  price_per_hour=float(d["price_per_hour"]))


def load_devices(devices_file: str | Path | None = None) -> dict[str, Device]:
    """Every device in the catalogue (measures the CPU); keys are normalised names (`h100`, `rtx4090`)."""
    return {k: _build_device(k, v) for k, v in _merged(devices_file).items()}


def get_device(name: str, devices_file: str | Path | None = None) -> Device:
    """Look a device up by name, case- and punctuation-insensitively (`H100`, `h100-sxm`, `RTX 4090`)."""
    table = _merged(devices_file)
    key = _key(name)
    if key not in table:
        known = ", ".join(v.get("name", k) for k, v in table.items())
        raise ValueError(f"unknown device {name!r}; choose one of: {known} (or add it in a devices file)")
    return _build_device(key, table[key])


@functools.lru_cache(maxsize=None)
def measure_cpu_peak(seconds_per_dtype: float = 0.5) -> dict[str, float]:
    """This CPU's best observed square-matmul FLOP/s in fp32 and bf16, with torch's current thread count.

    A CPU has no datasheet number that means anything for torch (it depends on AVX-512/AMX, cores, threads), so
    we time it: grow the matrix from 512 until one product takes ~20 ms (so overheads vanish), then keep the
    best rate over a short budget; about a second in all. A busy machine measures low, and a low peak would
    inflate MFU, so the best figure ever seen for this CPU model and thread count is remembered on disk
    (`$NANOSEEK_CACHE_DIR`, default ~/.cache/nanoseek) and used whenever it is higher. Cached per process.
    Pin `cpu` peaks in a devices file when receipts must compare across machines.
    """
    import torch  # deferred: `nanoseek cost` for a GPU never needs torch

    out = {}
    with torch.no_grad():
        for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            deadline = time.perf_counter() + seconds_per_dtype
            n = 512  # smaller products measure thread start-up, not arithmetic (and collapse on a busy machine)
            while True:
                a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
                torch.mm(a, b)  # warm-up: the first call at a size pays for allocation and kernel choice
                dt = _timed_mm(a, b)
                if dt < 0.02:  # best of two: one hiccup must not stop the growth
                    dt = min(dt, _timed_mm(a, b))
                if dt >= 0.02 or n >= 2048:
                    break
                n *= 2
            best = 2 * n**3 / dt
            while time.perf_counter() < deadline:
                best = max(best, 2 * n**3 / _timed_mm(a, b))
            out[label] = best
    return _best_ever_cpu_peak(out, torch.get_num_threads())


def _best_ever_cpu_peak(measured: dict[str, float], threads: int) -> dict[str, float]:
    """Merge this measurement with the best one on record for this CPU and thread count; keep the maximum."""
    cache = Path(os.environ.get("NANOSEEK_CACHE_DIR") or Path.home() / ".cache" / "nanoseek") / "cpu_peak.json"
    key = f"{_cpu_model()}|threads={threads}"
    try:
        record = json.loads(cache.read_text())
    except (OSError, ValueError):
        record = {}
    best = {k: max(v, float(record.get(key, {}).get(k, 0.0))) for k, v in measured.items()}
    if best != record.get(key):
        try:
            atomic_write_json(cache, {**record, key: best})
        except OSError:
            pass  # a read-only home: keep this process's figure
    return best


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _timed_mm(a: Any, b: Any) -> float:
    import torch

    t0 = time.perf_counter()
    torch.mm(a, b)
    return time.perf_counter() - t0


def detect_device() -> str:
    """The catalogue key for the accelerator torch will use: a GPU by its name, else `cpu`."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().upper()
    for key in ("H800", "H200", "H100", "A100", "B200", "4090"):
        if key in name:
            return _key(key)
    return _key(name)  # unknown GPU: a devices file entry under this name makes it costable


# ==================================================================== 3. receipts

DEFAULT_PROJECTION_MFU = 0.40  # a well-tuned dense run on H100 (nanochat d32: 51%; torchtitan Llama-8B: 33-39%)


def mfu(flops: float, seconds: float, peak_flops_per_device: float, num_devices: int = 1) -> float | None:
    """Model FLOPs utilisation: useful FLOPs done / FLOPs the devices could have done in that time."""
    capacity = seconds * num_devices * peak_flops_per_device
    return flops / capacity if capacity > 0 else None


@dataclass
class Receipt:
    """What one stage cost. Only measured inputs are stored; device-hours, dollars and MFU are derived."""

    stage: str
    device: str
    num_devices: int
    wall_seconds: float
    tokens: int
    flops: float
    peak_flops_per_device: float
    price_per_device_hour: float
    precision: str = "bf16"
    extra: dict[str, Any] = field(default_factory=dict)  # anything the stage wants kept (steps, run name, ...)

    @property
    def device_hours(self) -> float:
        return self.wall_seconds * self.num_devices / 3600.0

    @property
    def dollars(self) -> float:
        return self.device_hours * self.price_per_device_hour

    @property
    def mfu(self) -> float | None:
        return mfu(self.flops, self.wall_seconds, self.peak_flops_per_device, self.num_devices)

    @property
    def tokens_per_second(self) -> float | None:
        return self.tokens / self.wall_seconds if self.wall_seconds > 0 else None

    def projected(self, device: str = "h100", mfu: float = DEFAULT_PROJECTION_MFU,
                  devices_file: str | Path | None = None) -> dict[str, Any]:
        """The same FLOPs on ONE device of another kind at a stated MFU: compares runs made on any hardware.

        A CPU run's fp32 FLOPs are projected onto the GPU's bf16 peak, as they would run there."""
        precision = "bf16" if self.precision == "fp32" else self.precision
        return project_flops(self.flops, device, mfu, precision, devices_file)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(device_hours=self.device_hours, dollars=self.dollars, mfu=self.mfu,
                 tokens_per_second=self.tokens_per_second)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Receipt":
        """Read `to_dict()` output back; derived keys are ignored (recomputed), missing ones named."""
        names = [f.name for f in dataclasses.fields(cls)]
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"receipt is missing {', '.join(missing)}; it was not written by nanoseek's Receipt")
        return cls(**{k: d[k] for k in names if k in d})


def project_flops(flops: float, device: str = "h100", mfu: float = DEFAULT_PROJECTION_MFU,
                  precision: str = "bf16", devices_file: str | Path | None = None) -> dict[str, Any]:
    """Hours and dollars to do `flops` on one `device` at `mfu` of its peak."""
    if not 0 < mfu <= 1:
        raise ValueError(f"MFU must be a fraction in (0, 1], got {mfu}; write 40% as 0.4")
    dev = get_device(device, devices_file)
    hours = flops / (dev.peak_flops(precision) * mfu) / 3600.0
    return {"device": dev.name, "mfu": mfu, "precision": precision, "device_hours": hours,
            "dollars": hours * dev.price_per_hour}


def make_receipt(stage: str, device: str, wall_seconds: float, tokens: int, flops: float, num_devices: int = 1,
                 precision: str | None = None, price_per_hour: float | None = None,
                 devices_file: str | Path | None = None, **extra: Any) -> Receipt:
    """A receipt with the device's peak and price looked up in the catalogue (price overridable).

    `precision` is what the matmuls ran in; by default bf16 on a GPU and fp32 on the CPU (`default_precision`).
    `extra` keyword arguments are kept verbatim in the receipt (steps, run name, ...).
    """
    dev = get_device(device, devices_file)
    precision = precision or default_precision(device)
    price = dev.price_per_hour if price_per_hour is None else price_per_hour
    return Receipt(stage, dev.name, num_devices, wall_seconds, tokens, flops, dev.peak_flops(precision), price,
                   precision, dict(extra))




def write_receipt(receipt: Receipt, path: str | Path) -> None:
    atomic_write_json(path, receipt.to_dict())


def read_receipt(path: str | Path) -> Receipt:
    path = Path(path)
    try:
        return Receipt.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg}); re-run the stage to rewrite it") from None


def summarize(receipts: list[Receipt], project_to: str = "h100",
              projection_mfu: float = DEFAULT_PROJECTION_MFU) -> list[dict[str, Any]]:
    """Rows shaped like DeepSeek's cost table (stage, device-hours, dollars, same on one H100), plus a total."""
    rows = []
    for r in receipts:
        p = r.projected(project_to, projection_mfu)
        rows.append({"stage": r.stage, "device": f"{r.num_devices} x {r.device}", "device_hours": r.device_hours,
                     "dollars": r.dollars, "mfu": r.mfu, "tokens": r.tokens,
                     "projected_hours": p["device_hours"], "projected_dollars": p["dollars"]})
    rows.append({"stage": "Total", "device": "", "mfu": None,
                 **{k: sum(row[k] for row in rows) for k in
                    ("device_hours", "dollars", "tokens", "projected_hours", "projected_dollars")}})
    return rows


# ==================================================================== 4. published figures and serving

# DeepSeek-V3 Table 1 (arXiv 2412.19437): H800 GPU-hours; $2 per GPU-hour. Token counts: 14.8T pretraining
# (§4.2); context extension = two 1000-step phases, 1920 x 32K then 480 x 128K sequences (§4.3), ~63B each.
V3_STAGES = [
    {"stage": "Pre-training", "gpu_hours": 2664e3, "phases": [(14.8e12, 4096)]},
    {"stage": "Context extension", "gpu_hours": 119e3,
     "phases": [(1000 * 1920 * 32768, 32768), (1000 * 480 * 131072, 131072)]},
    {"stage": "Post-training", "gpu_hours": 5e3, "phases": []},  # SFT + RL token counts are not published
]
V3_PRICE = 2.00

# DeepSeek-R1 (Nature 645, supplementary): dollars at $2/H800-hour; GPU-hours are dollars / 2 (arith.).
R1_STAGES = [("R1-Zero", 202e3), ("SFT data", 10e3), ("R1", 82e3)]

# Small-budget anchors: s1 (arXiv 2501.19393: 26 min on 16 H100) and TinyZero (Jiayi-Pan/TinyZero: "< $30").
S1_H100_HOURS = 26 / 60 * 16
TINYZERO_DOLLARS = 30.0

# DeepSeek API, USD per 1M tokens (api-docs.deepseek.com/quick_start/pricing): (cache hit, miss, output).
API_PRICES = [
    ("deepseek-chat (V3), 2025-02-08", 0.07, 0.27, 1.10),
    ("deepseek-reasoner (R1), 2025-02-08", 0.14, 0.55, 2.19),
    ("both (V3.1), 2025-09-05", 0.07, 0.56, 1.68),
    ("both (V3.2-Exp), 2025-09-29", 0.028, 0.28, 0.42),
]
# DeepSeek's own serving (Open Source Week day 6): 14.8K output tok/s per 8-GPU H800 node in decode.
OSW_DECODE_TOKENS_PER_SECOND_PER_NODE = 14.8e3


def dollars_per_million_output_tokens(tokens_per_second: float, price_per_hour: float) -> float:
    """Serving cost: what an hour of the devices costs, spread over the output tokens they produce in it."""
    if tokens_per_second <= 0:
        raise ValueError(f"throughput must be positive, got {tokens_per_second} tokens/s")
    return price_per_hour / (tokens_per_second * 3600.0) * 1e6


def v3_published_table(cfg: ModelConfig | None = None) -> list[dict[str, Any]]:
    """DeepSeek-V3's cost table with the MFU our FLOPs model implies (against H800 bf16 and fp8 peaks).

    Uses the built-in H800 figures, not a user's devices file: the published table has one right answer."""
    cfg = cfg or deepseek_v3_671b()
    h800 = Device(**_CATALOGUE["h800"])
    rows = []
    for s in V3_STAGES:
        tokens = sum(n for n, _ in s["phases"])
        flops = sum(n * flops_per_token(cfg, seq) for n, seq in s["phases"])
        seconds = s["gpu_hours"] * 3600
        rows.append({"stage": s["stage"], "gpu_hours": s["gpu_hours"], "dollars": s["gpu_hours"] * V3_PRICE,
                     "tokens": tokens or None, "flops": flops or None,
                     "mfu_bf16": mfu(flops, seconds, h800.peak_flops("bf16")) if flops else None,
                     "mfu_fp8": mfu(flops, seconds, h800.peak_flops("fp8")) if flops else None})
    total = {"stage": "Total", "gpu_hours": sum(r["gpu_hours"] for r in rows),
             "dollars": sum(r["dollars"] for r in rows), "tokens": None, "flops": None, "mfu_bf16": None,
             "mfu_fp8": None}
    return rows + [total]


def published() -> dict[str, Any]:
    """Every built-in cited example, as data (the CLI prints it as tables or JSON)."""
    r1 = [{"stage": s, "dollars": d, "gpu_hours": d / V3_PRICE} for s, d in R1_STAGES]
    r1.append({"stage": "Total", **{k: sum(r[k] for r in r1) for k in ("dollars", "gpu_hours")}})
    h100 = _CATALOGUE["h100"]["price_per_hour"]
    node_price = 8 * V3_PRICE
    return {
        "deepseek_v3": v3_published_table(),
        "deepseek_r1": r1,
        "s1": {"h100_hours": S1_H100_HOURS, "dollars": S1_H100_HOURS * h100, "price_per_hour": h100},
        "tinyzero": {"dollars_under": TINYZERO_DOLLARS, "h100_hours_under": TINYZERO_DOLLARS / h100},
        "serving": {"deepseek_h800_node_dollars_per_million_output":
                    dollars_per_million_output_tokens(OSW_DECODE_TOKENS_PER_SECOND_PER_NODE, node_price),
                    "api_prices": [{"endpoint": e, "hit": a, "miss": b, "output": c} for e, a, b, c in API_PRICES]},
    }


def parse_count(text: str | float | int, what: str = "count") -> float:
    """`14.8T`, `500B`, `2M`, `119K`, `1e9`, `1_000_000` -> a number; K/M/B/T are powers of 1000 (G = B)."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        s = text.strip().replace("_", "").replace(",", "")
        m = re.fullmatch(r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([kKmMbBgGtT]?)", s)
        if not m:
            raise ValueError(f"{what} {text!r} is not a number; write e.g. 14.8T, 500B, 2M or 1e9")
        scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}[m.group(2).lower()]
        value = float(m.group(1)) * scale
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be positive, got {text}")
    return value


# ==================================================================== 5. `nanoseek cost`: estimates and tables


def default_precision(device: str) -> str:
    """bf16 on accelerators (what MFU is conventionally quoted against); fp32 on a CPU, which trains in fp32."""
    return "fp32" if _key(device) == "cpu" else "bf16"


def estimate(cfg: ModelConfig, tokens: float, device: str = "h100", num_devices: int = 1,
             seq_len: int | None = None, mfu: float | None = None, tokens_per_second: float | None = None,
             gpu_hours: float | None = None, price_per_hour: float | None = None, precision: str | None = None,
             include_mtp: bool = True, devices_file: str | Path | None = None) -> dict[str, Any]:
    """Hours and dollars to train `cfg` on `tokens`, from ONE of: an MFU, a measured throughput (tokens/s over
    all devices), or a published device-hour figure (the reverse mode: the MFU it implies). None: MFU 0.40."""
    given = [k for k, v in (("mfu", mfu), ("tokens_per_second", tokens_per_second), ("gpu_hours", gpu_hours))
             if v is not None]
    if len(given) > 1:
        raise ValueError(f"give only one of --mfu, --tokens-per-second, --gpu-hours (got {', '.join(given)})")
    if num_devices < 1:
        raise ValueError(f"--num-devices must be at least 1, got {num_devices}")
    for flag, v in (("--tokens", tokens), ("--tokens-per-second", tokens_per_second), ("--gpu-hours", gpu_hours)):
        if v is not None and not v > 0:
            raise ValueError(f"{flag} must be positive, got {v}")
    if price_per_hour is not None and price_per_hour < 0:
        raise ValueError(f"--price must be non-negative, got {price_per_hour}")
    dev = get_device(device, devices_file)
    precision = precision or default_precision(device)
    peak = dev.peak_flops(precision)
    seq_len = seq_len or default_seq_len(cfg)
    fpt = flops_per_token(cfg, seq_len, training=True, include_mtp=include_mtp)
    total = fpt * tokens
    capacity = peak * num_devices  # FLOP/s the whole job could do
    if gpu_hours is not None:
        device_hours = gpu_hours
        implied = total / (device_hours * 3600 * peak)
    else:
        if tokens_per_second is not None:
            implied = fpt * tokens_per_second / capacity
        else:
            implied = DEFAULT_PROJECTION_MFU if mfu is None else mfu
            if not 0 < implied <= 1:
                raise ValueError(f"--mfu must be a fraction in (0, 1], got {implied}; write 40% as 0.4")
        device_hours = total / (peak * implied) / 3600  # the same on 1 device or K: only wall time changes
    price = dev.price_per_hour if price_per_hour is None else price_per_hour
    wall_hours = device_hours / num_devices
    pc = param_counts(cfg)
    return {
        "mode": given[0] if given else "assumed_mfu", "tokens": int(tokens) if tokens == int(tokens) else tokens,
        "seq_len": seq_len,
        "params_total": pc["main_total"], "params_active": pc["active"], "params_mtp": pc["mtp"],
        "include_mtp": include_mtp, "flops_per_token": fpt, "total_flops": total,
        "device": dev.name, "num_devices": num_devices, "precision": precision, "peak_flops_per_device": peak,
        "mfu": implied, "tokens_per_second": tokens / (wall_hours * 3600), "wall_hours": wall_hours,
        "device_hours": device_hours, "price_per_device_hour": price, "dollars": device_hours * price,
    }
