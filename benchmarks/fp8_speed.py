"""FP8 vs bf16 training speed on a GPU: tokens/s of the same training step, preset by preset (issue 7).

Each preset's model is built once on the GPU (float32 master weights, fused AdamW), then timed in two precisions
on the same random batches: "bf16" (bf16 autocast, the baseline) and "fp8" (the same step after
`convert_to_fp8_training`: every linear but the head, and the routed experts, through blockwise FP8 GEMMs on
`torch._scaled_mm` where the installed torch offers it on this GPU). A step is forward (next-token + MTP loss),
backward, optimizer step and the expert-bias update; tokens/s counts batch x sequence tokens per step, median of
the timed steps after warm-up, synchronised with the device. Peak memory is read per precision.

    python benchmarks/fp8_speed.py                                  # d12,d16,d20,d24 on cuda
    python benchmarks/fp8_speed.py --presets smoke --device cpu --steps 2 --no-write   # checks the script runs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek.config import preset  # noqa: E402
from nanoseek.cost import flops_per_token  # noqa: E402
from nanoseek.fp8 import _kernel_available, convert_to_fp8_training  # noqa: E402
from nanoseek.model.transformer import DeepseekV3ForCausalLM  # noqa: E402
from results_md import publish  # noqa: E402 (benchmarks/ is the script's directory)

SECTION = "## FP8 training speed on a GPU (issue 7)"
DENSE_SECTION = "## FP8 training speed on a GPU, experts in bf16 (issue 7)"
KERNEL = "FP8 tensor cores (`torch._scaled_mm` with float32 1x128 scales; weight blocks pass theirs per row)"
EMULATED_EXPERTS = "in FP8, emulated (dequantised operands, bf16 grouped GEMM)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model, opt, batches, device, warmup: int) -> list[float]:
    times = []
    for i, (x, y) in enumerate(batches):
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, _ = model.loss(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_expert_bias()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if not torch.isfinite(loss):
        raise RuntimeError(f"the loss is {float(loss)}")
    return times


def run_preset(name: str, a, device: torch.device) -> dict:
    cfg = preset(name).replace(vocab_size=a.vocab_size) if a.vocab_size else preset(name)
    torch.manual_seed(0)
    with device:  # built and initialised on the device: a 3B model's float32 init on the host takes minutes
        model = DeepseekV3ForCausalLM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    g = torch.Generator().manual_seed(1)
    n = a.warmup + a.steps
    batches = [(t[:, :-1].to(device), t[:, 1:].to(device))
               for t in (torch.randint(cfg.vocab_size, (a.batch_size, a.seq_len + 1), generator=g) for _ in range(n))]
    row = {"preset": name, "params": sum(p.numel() for p in model.parameters()),
           "flops": flops_per_token(cfg, a.seq_len)}
    for precision in ("bf16", "fp8"):
        if precision == "fp8":
            convert_to_fp8_training(model, experts=not a.bf16_experts)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = time_steps(model, opt, batches, device, a.warmup)
        row[precision] = a.batch_size * a.seq_len / statistics.median(times)
        row[precision + "_mem"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        print(f"{name} {precision}: {row[precision]:,.0f} tok/s, {row[precision + '_mem']:.1f} GiB", flush=True)
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="d12,d16,d20,d24")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--vocab-size", type=int, default=None, help="override the presets' vocabulary")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--bf16-experts", action="store_true",
                    help="keep the routed experts in bf16 (their FP8 grouped GEMM is emulated on every device)")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("fp8_speed: no CUDA GPU here; run it on a Hopper GPU, or pass --device cpu to check the script")
        return 2
    try:
        for p in a.presets.split(","):
            preset(p)
    except ValueError as e:
        print(f"fp8_speed: {e}")
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (emulated FP8)"
    kernel = _kernel_available(device)
    rows = []
    for p in a.presets.split(","):
        try:
            rows.append(run_preset(p, a, device))
        except torch.cuda.OutOfMemoryError:
            print(f"{p}: out of memory at batch {a.batch_size} x {a.seq_len}; stopping here", flush=True)
            torch.cuda.empty_cache()
            break
    text = "\n".join([
        DENSE_SECTION if a.bf16_experts else SECTION, "",
        f"`python benchmarks/fp8_speed.py {' '.join(sys.argv[1:])}`".replace(" `", "`"), "",
        f"Device: {name}, torch {torch.__version__}; FP8 linears on {KERNEL if kernel else 'the emulation'}; "
        f"routed experts {'in bf16' if a.bf16_experts else EMULATED_EXPERTS}. "
        f"Batch {a.batch_size} x {a.seq_len} tokens of random ids, median of {a.steps} steps after {a.warmup}; "
        "a step = forward (next-token + MTP loss) + backward + fused AdamW + bias update, float32 master weights.", "",
        "| preset | parameters | bf16 tok/s | fp8 tok/s | fp8 / bf16 | bf16 TFLOP/s | peak GiB bf16 / fp8 |",
        "|---|---|---|---|---|---|---|",
        *[f"| `{r['preset']}` | {r['params'] / 1e6:,.0f}M | {r['bf16']:,.0f} | {r['fp8']:,.0f} | "
          f"**{r['fp8'] / r['bf16']:.2f}x** | {r['bf16'] * r['flops'] / 1e12:.0f} | "
          f"{r['bf16_mem']:.1f} / {r['fp8_mem']:.1f} |" for r in rows], "",
    ])
    if rows:
        best, last = max(r["fp8"] / r["bf16"] for r in rows), rows[-1]["fp8"] / rows[-1]["bf16"]
        verdict = "met" if last >= 1.3 else "not met"
        text += (f"\nTarget FP8 >= 1.3x bf16 on the largest preset that fits: **{verdict}** "
                 f"(`{rows[-1]['preset']}`: {last:.2f}x; best {best:.2f}x).\n")
    publish(DENSE_SECTION if a.bf16_experts else SECTION, text, write=not a.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
