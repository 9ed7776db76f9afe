"""`nanoseek cost`'s human-readable output: number formats and the plain-text tables.

The figures come from `nanoseek.cost`; this file only lays them out (DeepSeek's style: 2,664K GPU-hours, $5.576M).
"""

from __future__ import annotations

from typing import Any

from nanoseek.cost import Device


def si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:g}"


def hours(x: float) -> str:  # DeepSeek's style: 2,664K; 5K
    if x >= 1e3:
        return f"{x / 1e3:,.0f}K" if x >= 1e4 else f"{x / 1e3:.1f}K".replace(".0K", "K")
    return f"{x:,.1f}" if x >= 1 else f"{x:.3f}"


def tflops(x: float | None) -> str:
    return "-" if not x else f"{x:,.1f}" if x >= 10 else f"{x:.3g}"


def flops(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if x >= scale:
            return f"{x / scale:,.1f} {unit}FLOP"
    return f"{x:,.0f} FLOP"


def usd(x: float) -> str:
    return f"${x / 1e6:.3f}M" if x >= 1e6 else f"${x / 1e3:,.0f}K" if x >= 1e4 else f"${x:,.2f}"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def table(headers: list[str], rows: list[list[str]], left: tuple[int, ...] = (0,)) -> str:
    """Plain aligned text: the `left` columns (names) left-aligned, the rest (numbers) right-aligned."""
    widths = [max(len(c) for c in col) for col in zip(headers, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(headers)] + [line(r) for r in rows])


def render_estimate(e: dict[str, Any], model_name: str) -> str:
    how = {"mfu": "as given", "assumed_mfu": "assumed; set --mfu or --tokens-per-second",
           "tokens_per_second": f"implied by {e['tokens_per_second']:,.0f} tokens/s",
           "gpu_hours": f"implied by {hours(e['device_hours'])} device-hours"}[e["mode"]]
    mtp = f" (+{si(e['params_mtp'])} MTP)" if e["params_mtp"] else ""
    rows = [
        ("model", f"{model_name}: {si(e['params_total'])} parameters{mtp}, "
                  f"{si(e['params_active'])} active per token"),
        ("tokens", f"{si(e['tokens'])} at sequence length {e['seq_len']:,}"),
        ("FLOPs/token", f"{flops(e['flops_per_token'])} (training = 3 x forward"
                        f"{'; MTP included' if e['include_mtp'] and e['params_mtp'] else ''})"),
        ("total FLOPs", f"{e['total_flops']:.3e}"),
        ("device", f"{e['num_devices']} x {e['device']}: {tflops(e['peak_flops_per_device'] / 1e12)} TFLOP/s "
                   f"{e['precision']} peak each, ${e['price_per_device_hour']:.2f} per device-hour"),
        ("MFU", f"{pct(e['mfu'])} ({how})"),
        ("throughput", f"{e['tokens_per_second']:,.0f} tokens/s"),
        ("wall clock", f"{e['wall_hours']:,.2f} hours ({e['wall_hours'] / 24:,.1f} days)"),
        ("device-hours", hours(e["device_hours"])),
        ("cost", usd(e["dollars"])),
    ]
    return "\n".join(f"{k:<13} {v}" for k, v in rows)


def render_published(p: dict[str, Any]) -> str:
    v3 = [[r["stage"], hours(r["gpu_hours"]), usd(r["dollars"]), si(r["tokens"]) if r["tokens"] else "-",
           f"{r['flops']:.2e}" if r["flops"] else "-", pct(r["mfu_bf16"]), pct(r["mfu_fp8"])]
          for r in p["deepseek_v3"]]
    r1 = [[r["stage"], usd(r["dollars"]), hours(r["gpu_hours"])] for r in p["deepseek_r1"]]
    api = [[a["endpoint"], f"{a['hit']:.3f}", f"{a['miss']:.2f}", f"{a['output']:.2f}"]
           for a in p["serving"]["api_prices"]]
    s1, tz = p["s1"], p["tinyzero"]
    return "\n".join([
        "DeepSeek-V3 training cost (arXiv 2412.19437, Table 1; H800 at $2/GPU-hour)",
        table(["stage", "H800 GPU-hours", "USD", "tokens", "FLOPs (ours)", "MFU bf16", "MFU fp8"], v3),
        "MFU implied by our FLOPs model (3 x forward: active matmuls, causal attention, MTP) over the GPU-hours",
        "at H800 peaks of 989 (bf16) and 1979 (fp8) dense TFLOP/s. Context extension: 1000 steps of 1920 x 32K,",
        "then 1000 of 480 x 128K (V3 §4.3). Post-training tokens are not published.",
        "",
        "DeepSeek-R1 (Nature 645, supplementary; GPU-hours = USD / $2, excluding V3-Base)",
        table(["stage", "USD", "H800 GPU-hours"], r1),
        "",
        "Small budgets",
        f"s1 (arXiv 2501.19393): 26 min on 16 H100 = {s1['h100_hours']:.1f} H100-hours = {usd(s1['dollars'])} "
        f"at ${s1['price_per_hour']:.2f}/hour",
        f"TinyZero (github.com/Jiayi-Pan/TinyZero): < {usd(tz['dollars_under'])} = "
        f"< {tz['h100_hours_under']:.1f} H100-hours at ${s1['price_per_hour']:.2f}/hour",
        "",
        "Serving, USD per 1M tokens",
        f"DeepSeek's own decode (Open Source Week day 6): 14.8K output tokens/s per 8 x H800 node at $16/hour "
        f"= ${p['serving']['deepseek_h800_node_dollars_per_million_output']:.2f} per 1M output tokens",
        "DeepSeek API (api-docs.deepseek.com/quick_start/pricing):",
        table(["endpoint, from", "input hit", "input miss", "output"], api),
    ])


def render_devices(devices: dict[str, Device]) -> str:
    rows = [[d.name, tflops(d.bf16_tflops), tflops(d.fp8_tflops), tflops(d.fp32_tflops),
             f"${d.price_per_hour:.2f}", d.source] for d in devices.values()]
    return table(["device", "bf16 TFLOP/s", "fp8 TFLOP/s", "fp32 TFLOP/s", "$/hour", "source"], rows, (0, 5))
