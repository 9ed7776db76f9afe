"""Where a GPU decode step's time goes: the recorded graph alone, the whole step, and the kernels inside.

For each case (plain decode at batch 1 and 16 on a random `tiny` model; with --trained, plain and MTP-speculative
decoding at batch 1 on that checkpoint) it prints
- the replay time of each recorded step (200 back-to-back replays: the GPU's share of a step),
- the wall time per decode step of a whole 128-token greedy `generate`, and the device-busy time per step from
  the torch profiler (the difference is host work: copying inputs, launching, reading tokens back, bookkeeping),
- the kernels that take the most device time per step.

    python benchmarks/engine_profile.py --trained runs/base/model     # needs a CUDA GPU
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek.checkpoint import save_model  # noqa: E402
from nanoseek.config import preset  # noqa: E402
from nanoseek.infer.engine import Engine  # noqa: E402
from nanoseek.model.transformer import DeepseekV3ForCausalLM  # noqa: E402

NEW = 128


def report(engine: Engine, batch: int, speculative: bool, label: str, top: int) -> None:
    prompts = torch.randint(10, engine.config.vocab_size, (batch, 16), generator=torch.Generator().manual_seed(1))
    kw = dict(max_tokens=NEW, temperature=0.0, ignore_eos=True, speculative=speculative)
    engine.generate(prompts.tolist(), **kw)  # records every graph the timed run needs
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = engine.generate(prompts.tolist(), **kw)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    # each step yields 1 token plus its accepted drafts (acceptance is per drafted token, K per step)
    steps = NEW / (1 + engine.draft_tokens * outs[0].acceptance_rate) if speculative else NEW
    for (kind, padded, span, _), (graph, _) in sorted(engine.graphs.graphs.items()):
        if padded == engine.graphs.bucket(batch) and span == 128:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(200):
                graph.replay()
            torch.cuda.synchronize()
            print(f"  {label}: one replay of the recorded {kind} step: {(time.perf_counter() - t0) / 200 * 1e3:.3f} ms")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.generate(prompts.tolist(), **kw)
    kernels = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)
    busy = sum(e.self_device_time_total for e in kernels) / 1e3 / steps
    launched = sum(e.count for e in kernels if e.self_device_time_total > 0) / steps
    print(f"{label}: {wall / steps * 1e3:.3f} ms per step ({batch * NEW / wall:,.0f} tok/s); device busy {busy:.3f} ms "
          f"per step in ~{launched:.0f} kernels")
    for e in kernels[:top]:
        print(f"    {e.self_device_time_total / 1e3 / steps:7.4f} ms  x{e.count / steps:5.1f}  {e.key[:100]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trained", default=None, help="a trained checkpoint with MTP weights, for the speculative case")
    ap.add_argument("--top", type=int, default=10, help="kernels listed per case")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("engine_profile: this profiles CUDA graphs and needs a CUDA GPU")
        return 2
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="nanoseek-profile-"))
    save_model(DeepseekV3ForCausalLM(preset("tiny")), tmp / "model")
    engine = Engine(tmp / "model", dtype=torch.bfloat16, device="cuda", max_batch=16, max_len=16 + NEW + 8)
    report(engine, 1, False, "random tiny, batch 1", a.top)
    report(engine, 16, False, "random tiny, batch 16", a.top)
    if a.trained:
        trained = Engine(a.trained, dtype=torch.bfloat16, device="cuda", max_batch=1)
        report(trained, 1, False, "trained, batch 1, plain", a.top)
        report(trained, 1, True, "trained, batch 1, MTP speculation", a.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
