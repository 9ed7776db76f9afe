"""The report card: what every stage of a run cost, how it trained and how it scores, as markdown and PNG plots.

One or more run directories (pretrain -> sft -> grpo) become one `report.md`: a cost table per stage shaped like
DeepSeek-V3's Table 1 (device-hours and dollars as measured, and the same FLOPs projected onto one H100 at a stated
MFU, so a laptop run and a cluster run compare), a training summary, an evaluation table, and plots.

Reads only what the stages wrote: `config.json`, `metrics.jsonl`, `receipt.json` and `eval*.json`. Imports no torch;
matplotlib is imported when plotting, through its object-oriented API (no pyplot, no global backend switch).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek import cost, cost_tables
from nanoseek.atomic import atomic_write_bytes
from nanoseek.config import ModelConfig

# GRPO's per-step metrics, and how each is plotted: (keys, panel title, y label). A panel appears when its first
# key was logged; the others are drawn on the same axes when present.
RL_PANELS = [
    (("reward", "reward_std"), "reward (mean over rollouts, +-1 std)", "reward"),
    (("accuracy", "format_rate", "eval_accuracy", "eval_sampled_pass@1"), "accuracy and format", "fraction"),
    (("response_length",), "response length", "tokens"),
    (("kl",), "KL to the reference", "KL (nats)"),
    (("entropy",), "policy entropy", "nats/token"),
    (("clip_fraction",), "clipped ratio fraction", "fraction"),
    (("rollout_seconds", "update_seconds"), "time per step", "seconds"),
]
_EVAL_KEY = re.compile(r"(pass|maj)@(\d+)")


# ==================================================================== 1. reading a run


@dataclass
class Stage:
    """One run directory, as read from disk."""

    run_dir: Path
    name: str  # the stage: pretrain, sft, grpo, ...
    label: str  # unique within one report; prefixes its plot files
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    receipt: cost.Receipt | None
    evals: list[dict[str, Any]] = field(default_factory=list)
    eval_paths: set[Path] = field(default_factory=set)  # resolved, so a file also passed by hand is not listed twice
    notes: list[str] = field(default_factory=list)  # things the reader should know (skipped lines, files)

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) of the steps that logged `key` as a finite number."""
        xs, ys = [], []
        for i, m in enumerate(self.metrics):
            v = m.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                xs.append(m.get("step", i + 1))
                ys.append(float(v))
        return xs, ys

    def has(self, key: str) -> bool:
        return any(key in m for m in self.metrics)

    def model_config(self) -> ModelConfig | None:
        """From the run's config.json (pretraining writes the model there) or else the saved model's own config
        (fine-tuning runs start from a model directory)."""
        try:
            if "model" in self.config:
                return ModelConfig.from_hf_dict(dict(self.config["model"]))
            return ModelConfig.load(self.run_dir / "model")
        except Exception:  # an unknown or partial config must not stop the report
            return None


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Valid JSON objects from a metrics.jsonl, and how many lines were not (a crash can cut the last line)."""
    rows, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def load_run(run_dir: str | Path, label: str | None = None) -> Stage:
    """Read a run directory; anything that makes a report meaningless is one clear error."""
    d = Path(run_dir)
    if not d.exists():
        raise FileNotFoundError(f"{d} does not exist; give the --run directory of a pretrain, sft or grpo run")
    if not d.is_dir():
        raise NotADirectoryError(f"{d} is a file, not a run directory; give the --run directory of a stage")
    if not (d / "config.json").exists() and not (d / "metrics.jsonl").exists():
        raise ValueError(f"{d} is not a run directory (no config.json or metrics.jsonl); "
                         f"give the --run directory of a pretrain, sft or grpo run")
    config: dict[str, Any] = {}
    if (d / "config.json").exists():
        try:
            config = json.loads((d / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{d / 'config.json'} is not valid JSON ({e.msg}); was it edited?") from None
        if not isinstance(config, dict):
            raise ValueError(f"{d / 'config.json'} is not a run config (expected a JSON object)")
    if not (d / "metrics.jsonl").exists():
        raise ValueError(f"{d} has no metrics.jsonl: the run has not finished a step yet")
    metrics, bad = read_metrics(d / "metrics.jsonl")
    if not metrics:
        raise ValueError(f"{d / 'metrics.jsonl'} holds no metrics: the run has not finished a step yet")
    receipt, notes = None, []
    if bad:
        notes.append(f"{bad} unreadable line(s) in metrics.jsonl were skipped")
    if (d / "receipt.json").exists():
        try:
            receipt = cost.read_receipt(d / "receipt.json")
        except (ValueError, TypeError) as e:
            msg = str(e) if str(d) in str(e) else f"{d / 'receipt.json'}: {e}"
            raise ValueError(f"corrupt receipt: {msg}") from None
    else:
        notes.append("no receipt.json (is the run still going, or did it stop early?): its cost is not counted")
    name = str(config.get("stage") or metrics[0].get("stage") or (receipt.stage if receipt else "") or d.name)
    stage = Stage(d, name, label or _slug(name), config, metrics, receipt, notes=notes)
    for path in sorted(d.glob("eval*.json")):
        try:
            stage.evals += read_eval(path)
            stage.eval_paths.add(path.resolve())
        except ValueError as e:
            stage.notes.append(f"skipped {path.name}: {e}")
    return stage


def read_eval(path: str | Path) -> list[dict[str, Any]]:
    """Rows {source, task, num, pass@1, pass@k, maj@k} from an evaluation summary; missing keys are None."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"evaluation file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg})") from None
    rows = _eval_rows(data, path.name, None)
    if not rows:
        raise ValueError(f"{path} has no pass@k, maj@k or accuracy figures; is it a `nanoseek eval` summary?")
    return rows


def _eval_rows(data: Any, source: str, task: str | None) -> list[dict[str, Any]]:
    """Tolerant of shape: a summary, a list of them, or summaries nested under task names."""
    if isinstance(data, list):
        return [r for x in data for r in _eval_rows(x, source, task)]
    if not isinstance(data, dict):
        return []
    scores: dict[str, dict[int, float]] = {"pass": {}, "maj": {}}
    for k, v in data.items():
        m = _EVAL_KEY.fullmatch(str(k))
        if m and isinstance(v, (int, float)):
            scores[m.group(1)][int(m.group(2))] = float(v)
    if "pass@1" not in data and isinstance(data.get("accuracy"), (int, float)):
        scores["pass"][1] = float(data["accuracy"])
    if not scores["pass"] and not scores["maj"]:  # maybe {"gsm8k": {...}, ...} or {"results": [...]}
        return [r for k, v in data.items() if isinstance(v, (dict, list))
                for r in _eval_rows(v, source, task if k in ("results", "metrics", "summary", "tasks") else k)]
    big = lambda d: (max(d), d[max(d)]) if d else None  # noqa: E731 - the largest k is the headline
    passes = {k: v for k, v in scores["pass"].items() if k > 1}
    return [{"source": source, "task": data.get("task") or data.get("data") or task or "-",
             "num": data.get("num", data.get("n")), "pass@1": scores["pass"].get(1),
             "pass@k": big(passes), "maj@k": big(scores["maj"])}]


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-") or "stage"


def load_runs(run_dirs: list[str | Path]) -> list[Stage]:
    stages, seen = [], {}
    for d in run_dirs:
        stage = load_run(d)
        n = seen[stage.label] = seen.get(stage.label, 0) + 1
        if n > 1:  # two pretrain runs in one report: pretrain, pretrain-2
            stage.label = f"{stage.label}-{n}"
        stages.append(stage)
    return stages


# ==================================================================== 2. plots


def _figure(nrows: int, ncols: int, width: float, height: float, **kw: Any):
    from matplotlib.figure import Figure  # object-oriented: no pyplot state, works headless (Agg)

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False, **kw)


def _save(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _smooth(ys: list[float], w: int) -> list[float]:
    """Centred moving average (shrinking at the ends): unlike an EMA it does not lag behind the raw curve."""
    h, out = w // 2, []
    for i in range(len(ys)):
        part = ys[max(0, i - h): i + h + 1]
        out.append(sum(part) / len(part))
    return out


def _curve(ax: Any, xs: list[float], ys: list[float], label: str, color: str, **kw: Any) -> None:
    """Noisy per-step values: a faint raw line under a smoothed one once there are enough steps to smooth."""
    if len(ys) >= 50:
        ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(xs, _smooth(ys, max(5, len(ys) // 25)), color=color, label=f"{label} (smoothed)", **kw)
    else:
        ax.plot(xs, ys, color=color, label=label, marker="." if len(ys) < 50 else None, **kw)


def _maybe_log(ax: Any, *series: list[float], ratio: float = 4.0) -> None:
    """Log y when values span more than `ratio`, with plain-number ticks (2, 3, 5), not 2x10^0."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    vals = sorted(v for s in series for v in s)
    lo, hi = vals[len(vals) // 50] if vals else 0, vals[-1 - len(vals) // 50] if vals else 0  # ignore outliers
    if lo <= 0 or hi / lo <= ratio:
        return
    decades = math.log10(hi / lo)
    subs = (1, 2, 3, 4, 5, 6, 8) if decades <= 1.2 else (1, 2, 5) if decades <= 2.5 else (1,)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.6g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def plot_loss(stage: Stage, path: Path) -> Path | None:
    main_key = "main_loss" if stage.has("main_loss") else "loss"
    if stage.has("reward"):  # an RL stage's loss is a policy-gradient surrogate, not a cross-entropy: see plot_rl
        main_key = "-"
    train, mtp, val = stage.series(main_key), stage.series("mtp_loss"), stage.series("val_loss")
    if not train[1] and not val[1]:
        return None
    fig, ax = _figure(1, 1, 8, 4.5)
    ax = ax[0][0]
    if train[1]:
        _curve(ax, *train, "train (next token)", "tab:blue")
    if mtp[1]:
        _curve(ax, *mtp, "train MTP (token after next)", "tab:orange", linestyle="--")
    if val[1]:
        ax.plot(*val, color="tab:red", marker="o", markersize=4, label="held-out (next token)")
    h = (stage.receipt.extra.get("unigram_entropy") if stage.receipt else None)
    if isinstance(h, (int, float)):
        ax.axhline(h, color="gray", linestyle=":", label=f"unigram entropy {h:.2f} (a model that ignores context)")
    _maybe_log(ax, train[1], mtp[1], val[1])
    ax.set(title=f"{stage.label}: loss", xlabel="step", ylabel="cross-entropy (nats/token)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_throughput(stage: Stage, path: Path) -> Path | None:
    tps, mfu = stage.series("tokens_per_second"), stage.series("mfu")
    if not tps[1] and not mfu[1]:
        return None
    r = stage.receipt
    fig, axes = _figure(2, 1, 8, 5.5, sharex=True)
    top, bottom = axes[0][0], axes[1][0]
    if tps[1]:
        _curve(top, *tps, "tokens/s", "tab:green")
        top.axhline(_median(tps[1]), color="gray", linestyle=":", label=f"median {_median(tps[1]):,.0f} tokens/s")
        top.legend(fontsize=8)
    top.set(title=f"{stage.label}: throughput" + (f" on {r.num_devices} x {r.device}" if r else ""),
            ylabel="tokens / second")
    if mfu[1]:
        pct = [100 * v for v in mfu[1]]
        _curve(bottom, mfu[0], pct, "MFU", "tab:purple")
        bottom.axhline(_median(pct), color="gray", linestyle=":", label=f"median {_median(pct):.2f}%")
        bottom.legend(fontsize=8)
    peak = f" of {_rate(r.peak_flops_per_device)} {r.precision} peak" if r else ""
    bottom.set(title=f"model FLOPs utilisation{peak}", xlabel="step", ylabel="MFU (%)")
    for ax in (top, bottom):
        ax.set_ylim(bottom=0)  # rates from zero: a dip should look as big as it is
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _moe_layer_names(stage: Stage, n: int) -> list[str]:
    """Row labels for the per-MoE-layer lists: the main model's MoE layers, then each MTP module's."""
    cfg = stage.model_config()
    if cfg is not None:
        names = [f"layer {i}" for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
        if cfg.n_routed_experts > 0:
            names += [f"MTP {k + 1}" for k in range(cfg.num_nextn_predict_layers)]
        if len(names) == n:
            return names
    return [f"MoE {i}" for i in range(n)]


def plot_experts(stage: Stage, path: Path) -> Path | None:
    rows = [(m.get("step", i + 1), m["expert_load_max_over_mean"]) for i, m in enumerate(stage.metrics)
            if isinstance(m.get("expert_load_max_over_mean"), list) and m["expert_load_max_over_mean"]]
    if not rows:
        return None
    import numpy as np
    from matplotlib.colors import LogNorm

    n_layers = max(len(v) for _, v in rows)
    steps = [s for s, _ in rows]
    grid = np.full((n_layers, len(rows)), np.nan)
    for j, (_, v) in enumerate(rows):
        grid[: len(v), j] = [x if isinstance(x, (int, float)) else np.nan for x in v]
    cfg = stage.model_config()
    ceiling = cfg.n_routed_experts / cfg.num_experts_per_tok if cfg and cfg.num_experts_per_tok else None
    bias = [(s, m["bias_norm"]) for s, m in ((m.get("step", i + 1), m) for i, m in enumerate(stage.metrics))
            if isinstance(m.get("bias_norm"), list)]
    fig, axes = _figure(2 if bias else 1, 1, 9, 6 if bias else 3.6, sharex=True,
                        gridspec_kw={"height_ratios": [3, 2]} if bias else None)
    ax = axes[0][0]
    hi = max(float(np.nanmax(grid)), ceiling or 1.0, 1.01)
    half = (steps[-1] - steps[0]) / max(len(steps) - 1, 1) / 2 if len(steps) > 1 else 0.5
    im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="magma_r", origin="upper",
                   norm=LogNorm(vmin=1.0, vmax=hi),
                   extent=(steps[0] - half, steps[-1] + half, n_layers - 0.5, -0.5))
    names = _moe_layer_names(stage, n_layers)
    ax.set_yticks(range(n_layers), names)
    ax.set(title=f"{stage.label}: expert load, busiest expert / mean (1 = balanced)", ylabel="MoE layer")
    cb = fig.colorbar(im, ax=ax, pad=0.01)
    note = f" ({ceiling:g} = every token on the same {cfg.num_experts_per_tok})" if ceiling else ""
    cb.set_label(f"max / mean load{note}", fontsize=8)
    ticks = [t for t in (1, 1.5, 2, 3, 4, 6, 8, 16, 32, 64) if t <= hi]
    cb.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])
    if bias:
        bx = axes[1][0]
        width = max(len(v) for _, v in bias)
        labels = names if len(names) >= width else [f"MoE {k}" for k in range(width)]
        for i in range(width):
            pts = [(s, v[i]) for s, v in bias if i < len(v) and isinstance(v[i], (int, float))]
            bx.plot([p[0] for p in pts], [p[1] for p in pts], label=labels[i])
        bx.set(title="routing bias norm |b| (aux-loss-free balancing moves b to even out load)",
               xlabel="step", ylabel="|b|")
        bx.grid(alpha=0.3)
        bx.legend(fontsize=7, ncol=min(width, 6))
    else:
        ax.set_xlabel("step")
    return _save(fig, path)


def plot_rl(stage: Stage, path: Path) -> Path | None:
    panels = [p for p in RL_PANELS if stage.has(p[0][0])]
    if not panels:
        return None
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = _figure(nrows, ncols, 4.2 * ncols, 3.3 * nrows)
    colors = ["tab:blue", "tab:orange", "tab:red"]
    for ax, (keys, title, ylabel) in zip([a for row in axes for a in row], panels):
        xs, ys = stage.series(keys[0])
        if keys[0] == "reward":
            _curve(ax, xs, ys, "reward", colors[0])
            sx, sd = stage.series("reward_std")
            if sd and len(sx) == len(xs):
                ax.fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)],
                                color=colors[0], alpha=0.12, label="+-1 std")
        else:
            for key, color in zip(keys, colors):
                kx, ky = stage.series(key)
                if not ky:
                    continue
                if key.startswith("eval_"):  # periodic held-out evaluation: points, not a noisy curve
                    ax.plot(kx, ky, color=color, marker="o", markersize=4, label=f"held-out {key[5:]}")
                else:
                    _curve(ax, kx, ky, key.replace("_", " "), color)
        if keys[0] == "accuracy":
            ax.set_ylim(-0.02, 1.02)
        if keys[0] in ("kl",):
            _maybe_log(ax, ys, ratio=100.0)
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in [a for row in axes for a in row][len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{stage.label}: reinforcement learning")
    return _save(fig, path)


PLOTS = [("loss", plot_loss), ("throughput", plot_throughput), ("experts", plot_experts), ("rl", plot_rl)]


def plot_stage(stage: Stage, out_dir: Path) -> list[tuple[str, Path]]:
    """Every plot that applies to this stage, as (kind, path); stages skip plots they have no metrics for."""
    done = []
    for kind, fn in PLOTS:
        path = fn(stage, out_dir / f"{stage.label}_{kind}.png")
        if path is not None:
            done.append((kind, path))
    return done


# ==================================================================== 3. markdown


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return (s[len(s) // 2] + s[(len(s) - 1) // 2]) / 2 if s else math.nan


def _window_mean(ys: list[float], last: bool) -> float | None:
    """Mean over the first or last ~10% of steps (1 to 10): one step's loss is noise, not a result."""
    if not ys:
        return None
    w = max(1, min(10, len(ys) // 10))
    part = ys[-w:] if last else ys[:w]
    return sum(part) / len(part)


def _num(x: float | None, fmt: str = ".4f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def _hours_cell(h: float) -> str:
    return cost_tables.hours(h) if h >= 1 else f"{h:.2g}" if h >= 1e-3 else "0" if h == 0 else f"{h:.1e}"


def _usd_cell(x: float) -> str:
    return cost_tables.usd(x) if x >= 0.01 else "$0" if x == 0 else f"${x:.1e}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%" if x >= 0.01 else f"{100 * x:.2g}%"


def _rate(flops_per_second: float) -> str:
    x = flops_per_second
    return f"{x / 1e12:,.4g} TFLOP/s" if x >= 1e12 else f"{x / 1e9:,.4g} GFLOP/s"


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _md_table(headers: list[str], rows: list[list[str]], left: int = 1) -> str:
    """A GitHub table; the first `left` columns are names, the rest numbers (right-aligned)."""
    align = ["---" if i < left else "---:" for i in range(len(headers))]
    return "\n".join("| " + " | ".join(r) + " |" for r in [headers, align] + rows)


def _model_line(stage: Stage) -> str:
    cfg = stage.model_config()
    if cfg is None:
        return f"unknown model (no readable model config in {stage.run_dir})"
    c = cost.param_counts(cfg)
    n = cfg.num_nextn_predict_layers
    mtp = f" (+{cost_tables.si(c['mtp'])} in {n} MTP module{'s' * (n > 1)})" if c["mtp"] else ""
    dense = cfg.num_hidden_layers - cfg.num_moe_layers
    moe = (f"{dense} dense + {cfg.num_moe_layers} MoE, each MoE with {cfg.n_routed_experts} routed experts "
           f"(top-{cfg.num_experts_per_tok}) and {cfg.n_shared_experts} shared" if cfg.num_moe_layers else "all dense")
    return (f"{cost_tables.si(c['main_total'])} parameters{mtp}, {cost_tables.si(c['active'])} active per token; "
            f"{cfg.num_hidden_layers} layers: {moe}; hidden {cfg.hidden_size}, {cfg.num_attention_heads} MLA heads "
            f"(KV latent {cfg.kv_lora_rank}), vocab {cfg.vocab_size:,}")


def cost_section(stages: list[Stage], project_to: str, mfu: float) -> list[str]:
    with_receipt = [s for s in stages if s.receipt is not None]
    target = cost.get_device(project_to)
    col_h, col_d = f"{target.name}-hours at {mfu:.0%} MFU", f"USD on {target.name}"
    out = ["## Cost", ""]
    if with_receipt:
        summary = cost.summarize([s.receipt for s in with_receipt], project_to, mfu)
        walls = [s.receipt.wall_seconds for s in with_receipt]
        rows = []
        for i, row in enumerate(summary):
            total = i == len(with_receipt)
            bold = (lambda x: f"**{x}**") if total else (lambda x: x)  # noqa: E731
            rows.append([bold("Total" if total else with_receipt[i].label), row["device"],
                         _duration(sum(walls) if total else walls[i]), bold(_hours_cell(row["device_hours"])),
                         bold(_usd_cell(row["dollars"])), cost_tables.si(row["tokens"]),
                         _pct(row["mfu"]),
                         bold(_hours_cell(row["projected_hours"])), bold(_usd_cell(row["projected_dollars"]))])
        out.append(_md_table(["stage", "device", "wall clock", "device-hours", "USD", "tokens", "MFU",
                              col_h, col_d], rows, left=2))
        prec = "bf16"
        out += ["", f"Measured: wall clock x devices x the receipt's price per device-hour; MFU = model FLOPs "
                    f"(active parameters + attention, MTP included) / peak. Projected: the same FLOPs on one "
                    f"{target.name} ({target.peak_flops(prec) / 1e12:,.0f} TFLOP/s {prec} peak) at {mfu:.0%} MFU "
                    f"and ${target.price_per_hour:.2f}/hour. For scale, DeepSeek-V3 (Table 1): 2,788K H800 "
                    f"GPU-hours, $5.576M at $2/GPU-hour."]
    else:
        out.append("No stage has a receipt.json yet, so there is nothing to cost.")
    missing = [s.label for s in stages if s.receipt is None]
    if missing and with_receipt:
        out += ["", f"Not counted (no receipt.json): {', '.join(missing)}."]
    return out


def training_section(stages: list[Stage]) -> list[str]:
    rows = []
    for s in stages:
        _, loss = s.series("-" if s.has("reward") else "main_loss" if s.has("main_loss") else "loss")
        _, val = s.series("val_loss")
        _, mtp = s.series("mtp_loss")
        _, tokens = s.series("tokens")
        steps = s.metrics[-1].get("step", len(s.metrics))
        rows.append([s.label, f"{steps:,}", cost_tables.si(tokens[-1]) if tokens else "-",
                     _num(_window_mean(loss, False)), _num(_window_mean(loss, True)),
                     _num(val[-1] if val else None), _num(min(val) if val else None), _num(_window_mean(mtp, True))])
    out = ["## Training", "", _md_table(["stage", "steps", "tokens", "train loss (start)", "train loss (end)",
                                         "held-out loss (final)", "held-out loss (best)", "MTP loss (end)"], rows),
           "", "Train losses are means over the first / last ~10% of steps (at most 10); losses in nats per token."]
    rl = [s for s in stages if s.has("reward")]
    if rl:
        rows = []
        for s in rl:
            def ends(key: str, fmt: str = ".3f") -> str:
                ys = s.series(key)[1]
                return f"{_num(_window_mean(ys, False), fmt)} -> {_num(_window_mean(ys, True), fmt)}" if ys else "-"
            ev = s.series("eval_accuracy")[1]
            rows.append([s.label, ends("reward"), ends("accuracy"), ends("format_rate"),
                         f"{_num(ev[0], '.3f')} -> {_num(ev[-1], '.3f')}" if ev else "-",
                         ends("response_length", ".0f"), _num(_window_mean(s.series("kl")[1], True))])
        out += ["", "Reinforcement learning (start -> end):", "",
                _md_table(["stage", "reward", "accuracy", "format rate", "held-out accuracy", "response length",
                           "KL (end)"], rows)]
    return out


def eval_section(stages: list[Stage], extra: list[dict[str, Any]]) -> list[str]:
    rows = [(s.label, e) for s in stages for e in s.evals] + [("-", e) for e in extra]
    out = ["## Evaluation", ""]
    if not rows:
        return out + ["No evaluations found: `nanoseek eval ... --out RUN/eval_TASK.json` writes one "
                      "(or pass files with `--eval`)."]

    def at_k(x: tuple[int, float] | None) -> str:
        return "-" if x is None else f"{x[1]:.4f} (k={x[0]})"
    table = [[label, e["task"], e["source"], "-" if e["num"] is None else str(e["num"]), _num(e["pass@1"]),
              at_k(e["pass@k"]), at_k(e["maj@k"])] for label, e in rows]
    return out + [_md_table(["stage", "task", "file", "problems", "pass@1", "pass@k", "maj@k"], table, left=3)]


def _grouped(title: str, pairs: list[tuple[str, str]]) -> list[str]:
    """One bullet per distinct value, naming the stages only when stages differ."""
    groups: dict[str, list[str]] = {}
    for label, text in pairs:
        groups.setdefault(text, []).append(label)
    return [f"- **{title}**{'' if len(groups) == 1 else ' (' + ', '.join(ls) + ')'}: {t}" for t, ls in groups.items()]


def render_markdown(stages: list[Stage], plots: dict[str, list[tuple[str, Path]]], out_dir: Path,
                    project_to: str, mfu: float, evals: list[dict[str, Any]], command: str | None) -> str:
    lines = ["# nanoseek report card", ""]
    runs = ", ".join(f"`{s.run_dir}` ({s.name})" for s in stages)
    lines.append(f"Runs: {runs}. Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
                 + (f" by `{command}`." if command else "."))
    lines.append("")
    lines += _grouped("Model", [(s.label, _model_line(s)) for s in stages])
    lines += _grouped("Device", [(s.label, f"{s.receipt.num_devices} x {s.receipt.device}, {s.receipt.precision}, "
                                           f"{_rate(s.receipt.peak_flops_per_device)} peak each, "
                                           f"${s.receipt.price_per_device_hour:.2f} per device-hour")
                                 for s in stages if s.receipt])
    lines.append("")
    lines += cost_section(stages, project_to, mfu) + [""]
    lines += training_section(stages) + [""]
    lines += eval_section(stages, evals) + [""]
    lines += ["## Plots", ""]
    captions = {"loss": "loss", "throughput": "throughput and MFU", "experts": "expert load",
                "rl": "reinforcement learning"}
    for s in stages:
        for kind, path in plots.get(s.label, []):
            rel = os.path.relpath(path, out_dir).replace(os.sep, "/")
            lines += [f"### {s.label}: {captions[kind]}", "", f"![{s.label} {captions[kind]}]({rel})", ""]
    notes = [f"- {s.label}: {n}" for s in stages for n in s.notes]
    if notes:
        lines += ["## Notes", ""] + notes + [""]
    return "\n".join(lines).rstrip() + "\n"


# ==================================================================== 4. the entry point


def write_report(run_dirs: list[str | Path] | str | Path, out_dir: str | Path | None = None,
                 project_to: str = "h100", projection_mfu: float = cost.DEFAULT_PROJECTION_MFU,
                 eval_files: list[str | Path] = (), command: str | None = None) -> Path:
    """Write report.md and its PNG plots for one or more stages; returns the path of report.md.

    Several runs are stages of one pipeline (pretrain -> sft -> grpo), listed and summed in the order given. By
    default the report goes into the last run directory, the stage whose model the pipeline ends with.
    """
    run_dirs = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    if not run_dirs:
        raise ValueError("give at least one run directory")
    if not 0 < projection_mfu <= 1:
        raise ValueError(f"the projection MFU must be a fraction in (0, 1], got {projection_mfu}; write 40% as 0.4")
    cost.get_device(project_to)  # an unknown device is an error before any work
    stages = load_runs(run_dirs)
    evals = []
    for f in map(Path, eval_files):  # a file inside a stage's run directory belongs to that stage
        owner = next((s for s in stages if f.resolve().parent == s.run_dir.resolve()), None)
        if owner is None:
            evals += read_eval(f)
        elif f.resolve() not in owner.eval_paths:
            owner.evals += read_eval(f)
            owner.eval_paths.add(f.resolve())
    out = Path(out_dir) if out_dir is not None else stages[-1].run_dir
    out.mkdir(parents=True, exist_ok=True)
    plots = {s.label: plot_stage(s, out) for s in stages}
    text = render_markdown(stages, plots, out, project_to, projection_mfu, evals, command)
    path = out / "report.md"
    atomic_write_bytes(path, text.encode("utf-8"))
    return path
