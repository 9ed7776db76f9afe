"""Issue 3's measurement: a `tiny` run of 10 minutes on this CPU, with and without aux-loss-free balancing.

    nanoseek pretrain --preset tiny --run runs/tiny --minutes 10                               # balancing on
    nanoseek pretrain --preset tiny --run runs/tiny-nobalance --minutes 10 --set bias_update_speed=0
    python benchmarks/pretrain_tiny.py runs/tiny runs/tiny-nobalance

Plots held-out loss against the corpus's unigram entropy, and the worst layer's max/mean expert load for both
runs, into benchmarks/pretrain_tiny.png, and prints the markdown table for RESULTS.md.
"""

import json
import sys
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main(on: Path, off: Path, out: Path = Path(__file__).with_name("pretrain_tiny.png")) -> None:
    entropy = json.loads((on / "receipt.json").read_text())["extra"]["unigram_entropy"]
    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    loss_ax, load_ax = fig.subplots(1, 2)
    for run, label, color in ((on, "balancing on (bias speed 0.01)", "tab:blue"), (off, "balancing off", "tab:red")):
        r = rows(run)
        minutes = [x["elapsed"] / 60 for x in r]
        loss_ax.plot(minutes, [x["loss"] for x in r], color=color, alpha=0.35, lw=1)
        val = [x for x in r if "val_loss" in x]
        loss_ax.plot([x["elapsed"] / 60 for x in val], [x["val_loss"] for x in val], "o-", color=color,
                     label=f"held-out, {label}")
        load_ax.plot([x["step"] for x in r], [max(x["expert_load_max_over_mean"]) for x in r], color=color,
                     label=label)
    loss_ax.axhline(entropy, color="gray", ls="--", label=f"unigram entropy {entropy:.2f}")
    loss_ax.set(xlabel="training minutes", ylabel="loss (nats/token)", title="tiny on 1 CPU thread: loss")
    loss_ax.legend(fontsize=8)
    load_ax.axhline(1.5, color="gray", ls=":", label="target 1.5")
    load_ax.set(xlabel="step", ylabel="max/mean tokens per expert (worst layer)", yscale="log",
                title="expert load, no auxiliary loss")
    load_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    for run in (on, off):
        last = rows(run)[-1]
        rec = json.loads((run / "receipt.json").read_text())
        print(f"| {run.name} | {last['step']} | {rec['tokens']:,} | {rec['wall_seconds'] / 60:.1f} | "
              f"{last['val_loss']:.3f} | {entropy:.3f} | {max(last['expert_load_max_over_mean']):.2f} | "
              f"{', '.join(f'{v:.2f}' for v in last['expert_load_max_over_mean'])} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
