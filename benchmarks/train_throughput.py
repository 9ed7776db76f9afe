"""Training throughput: nanoseek vs transformers' DeepseekV3ForCausalLM, side by side on the CPU.

Both models start from the same weights (ours saved with `save_model`, theirs loaded from that directory with
`from_pretrained`), see the same batch, and run the same step: forward + backward + AdamW under bf16 autocast with
float32 master weights. The contestants take turns one step at a time, so a noisy neighbour or a clock change
hits all of them alike; the median over the timed steps is reported.

Rows:
  nanoseek (MTP)       our default pretraining objective: next-token CE + MTP loss (+ the bias update)
  nanoseek (no MTP)    `mtp_weight=0.0`: exactly the peer's objective, the like-for-like comparison
  transformers         its own CE loss via `labels=` (it has no MTP)
  nanoseek compiled    optional (`--compile`): the no-MTP step through `torch.compile`

MFU = model FLOPs per second / this CPU's bf16 matmul peak, measured in this same process with the same thread
count. Model FLOPs = 6 x active matmul parameters per token + causal attention (nanoseek.cost.flops_per_token).

    python benchmarks/train_throughput.py                      # tiny preset, writes benchmarks/RESULTS.md
    python benchmarks/train_throughput.py --preset d4 --batch-size 4 --seq-len 128 --no-write
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from nanoseek.checkpoint import save_model
from nanoseek.config import ModelConfig, preset
from nanoseek.model.transformer import DeepseekV3ForCausalLM
from results_md import RESULTS, publish  # noqa: E402 (benchmarks/ is the script's directory)

SECTION = "## Training throughput (issue 2)"


# ==================================================================== FLOPs and peak
def model_flops_per_token(cfg: ModelConfig, seq_len: int, mtp: bool) -> float:
    """Training FLOPs per token. Prefer the project's cost model; fall back to the same formula written here."""
    try:
        from nanoseek.cost import flops_per_token
        return flops_per_token(cfg, seq_len, training=True, include_mtp=mtp)
    except ImportError:
        pass
    D, H, L = cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers
    q = D * H * cfg.qk_head_dim if cfg.q_lora_rank is None else D * cfg.q_lora_rank + cfg.q_lora_rank * H * cfg.qk_head_dim
    attn = q + D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim) \
        + H * cfg.v_head_dim * D
    dense = 3 * D * cfg.intermediate_size
    moe = 3 * D * cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts) + D * cfg.n_routed_experts
    per_layer = [attn + (moe if cfg.is_moe_layer(i) else dense) for i in range(L)]
    matmul = sum(per_layer) + D * cfg.vocab_size
    score = 2.0 * H * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len / 2  # causal: seq_len/2 keys on average
    fwd = 2.0 * matmul + L * score
    if mtp:
        k = cfg.num_nextn_predict_layers
        fwd += k * (2.0 * (attn + (moe if cfg.n_routed_experts else dense) + 2 * D * D + D * cfg.vocab_size) + score)
    return 3.0 * fwd


def matmul_peak(dtype: torch.dtype, n: int = 1024, repeats: int = 3) -> float:
    """Best observed FLOP/s of an n x n matmul in `dtype` with torch's current thread count."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)  # first call pays for allocation and kernel selection
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


# ==================================================================== the contestants
class Contestant:
    """One model + AdamW + a closure that runs a full training step; `step()` returns its wall time."""

    def __init__(self, name: str, model: torch.nn.Module, loss_fn, after_step=None, lr: float = 3e-4):
        self.name, self.model, self.loss_fn, self.after_step = name, model, loss_fn, after_step
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=False)
        self.times: list[float] = []
        self.losses: list[float] = []

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = self.loss_fn(x, y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.after_step is not None:
            self.after_step()
        dt = time.perf_counter() - t0
        self.losses.append(loss.item())
        return dt


def build(cfg: ModelConfig, compile_: bool, workdir: Path) -> list[Contestant]:
    from transformers import DeepseekV3ForCausalLM as HFDeepseekV3
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its load report lists our MTP weights, which it has no place for
    hf_logging.disable_progress_bar()

    torch.manual_seed(0)
    ours = DeepseekV3ForCausalLM(cfg).train()
    save_model(ours, workdir / "model")
    # Independent copies so each contestant's optimizer moves only its own weights; all start identical.
    ours_nomtp = DeepseekV3ForCausalLM(cfg).train()
    ours_nomtp.load_state_dict(ours.state_dict())
    theirs = HFDeepseekV3.from_pretrained(workdir / "model", dtype=torch.float32).train()

    def hf_loss(x, y):
        # transformers shifts `labels` itself, so it gets the inputs; it scores T-1 positions of the same logits.
        return theirs(input_ids=x, labels=x).loss

    out = [
        Contestant("nanoseek (MTP)", ours, lambda x, y: ours.loss(x, y)[0], ours.update_expert_bias),
        Contestant("nanoseek (no MTP)", ours_nomtp, lambda x, y: ours_nomtp.loss(x, y, mtp_weight=0.0)[0],
                   ours_nomtp.update_expert_bias),
        Contestant("transformers", theirs, hf_loss),
    ]
    if compile_:
        ours_c = DeepseekV3ForCausalLM(cfg).train()
        ours_c.load_state_dict(ours.state_dict())
        compiled = torch.compile(lambda x, y: ours_c.loss(x, y, mtp_weight=0.0)[0])
        out.append(Contestant("nanoseek (no MTP, compiled)", ours_c, compiled, ours_c.update_expert_bias))
    return out


# ==================================================================== report
def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = m.group(1).strip() if m else cpu
    import transformers
    return (f"{cpu}, {torch.get_num_threads()} threads ({torch.multiprocessing.cpu_count()} logical CPUs), "
            f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}")


def config_summary(cfg: ModelConfig, name: str) -> str:
    from nanoseek.cost import param_counts
    try:
        pc = param_counts(cfg)
        params = f"{pc['total'] / 1e6:.1f}M params, {pc['matmul_active'] / 1e6:.1f}M active matmul"
    except Exception:  # the cost module is young; the summary is still useful without counts
        params = f"{sum(p.numel() for p in DeepseekV3ForCausalLM(cfg).parameters()) / 1e6:.1f}M params"
    return (f"`{name}`: {params}; {cfg.num_hidden_layers} layers (first {cfg.first_k_dense_replace} dense), "
            f"hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads, kv_lora {cfg.kv_lora_rank}, q_lora "
            f"{cfg.q_lora_rank}, {cfg.n_routed_experts} routed experts top-{cfg.num_experts_per_tok} + "
            f"{cfg.n_shared_experts} shared, vocab {cfg.vocab_size}, {cfg.num_nextn_predict_layers} MTP module")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per contestant")
    p.add_argument("--steps", type=int, default=4, help="timed steps per contestant")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true", help="add a row for nanoseek under torch.compile")
    p.add_argument("--no-write", action="store_true", help=f"print only; do not update {RESULTS.name}")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = preset(args.preset)
    B, T = args.batch_size, args.seq_len
    tokens = B * T
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
    x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    # Both peaks: on CPUs without native bf16 (AVX2 only) torch's bf16 GEMM is a slow reference kernel, and
    # nanoseek then runs its bf16-rounded matmuls on the float32 kernel (nanoseek/model/linear.py).
    peaks, fp32_peaks = [matmul_peak(torch.bfloat16)], [matmul_peak(torch.float32, n=2048)]
    with tempfile.TemporaryDirectory() as tmp:
        contestants = build(cfg, args.compile, Path(tmp))
    print(f"{args.preset}: batch {B} x seq {T} = {tokens} tokens/step, {torch.get_num_threads()} threads")
    for i in range(args.warmup + args.steps):
        # Rotate who goes first so no contestant always runs right after the same neighbour.
        order = contestants[i % len(contestants):] + contestants[: i % len(contestants)]
        for c in order:
            dt = c.step(x, y)
            if i >= args.warmup:
                c.times.append(dt)
        print(f"  step {i + 1}/{args.warmup + args.steps}: " +
              ", ".join(f"{c.name} {c.losses[-1]:.3f}" for c in contestants), file=sys.stderr)
    peaks.append(matmul_peak(torch.bfloat16))
    fp32_peaks.append(matmul_peak(torch.float32, n=2048))
    peak, fp32_peak = max(peaks), max(fp32_peaks)

    peer = next(c for c in contestants if c.name == "transformers")
    peer_tps = tokens / statistics.median(peer.times)
    rows = []
    for c in contestants:
        med = statistics.median(c.times)
        tps = tokens / med
        ours = c is not peer
        mtp = c.name == "nanoseek (MTP)"
        flops = model_flops_per_token(cfg, T, mtp=mtp) * tokens / med
        rows.append([c.name, f"{med * 1e3:.0f}", f"{min(c.times) * 1e3:.0f}", f"{tps:,.0f}",
                     f"{tps / peer_tps:.2f}x", f"{flops / 1e9:.1f}", f"{flops / peak:.1%}" if ours else "-",
                     f"{flops / fp32_peak:.1%}" if ours else "-"])
        # The peer's row shows its FLOP/s too (same formula, no MTP) but MFU is only claimed for nanoseek.
    header = ["model", "median ms/step", "best ms/step", "tokens/s", "vs transformers", "model GFLOP/s", "MFU (bf16 peak)", "MFU (fp32 peak)"]
    table = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
                      ["| " + " | ".join(r) + " |" for r in rows])
    cmd = "python benchmarks/train_throughput.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    text = (f"{SECTION}\n\n"
            f"Forward + backward + AdamW step, bf16 autocast over float32 weights, CPU; same config, weights and "
            f"batch for all rows; contestants alternate step by step; {args.warmup} warm-up + {args.steps} timed "
            f"steps each, median reported. \"no MTP\" is the like-for-like row (the peer has no MTP); the MTP row "
            f"is our default objective and does more work per token (counted in its MFU).\n\n"
            f"- command: `{cmd}`\n- machine: {machine()}\n- config: {config_summary(cfg, args.preset)}; "
            f"batch {B} x seq {T} = {tokens} tokens/step\n"
            f"- bf16 matmul peak (1024^3 torch.mm, best of 3, before and after the run): {peak / 1e9:.1f} "
            f"GFLOP/s (runs: {', '.join(f'{q / 1e9:.1f}' for q in peaks)}); float32 peak (2048^3): "
            f"{fp32_peak / 1e9:.1f} GFLOP/s (runs: {', '.join(f'{q / 1e9:.1f}' for q in fp32_peaks)}); this CPU "
            f"{'has' if torch.ops.mkldnn._is_mkldnn_bf16_supported() else 'has no'} native bf16 GEMM\n"
            f"- model FLOPs: 6 x active matmul params per token + causal attention (`nanoseek.cost.flops_per_token`)"
            f"\n\n{table}\n")
    print()
    publish(SECTION, text, write=not args.no_write)


if __name__ == "__main__":
    main()
