"""DeepSeekMoE: a sigmoid router with group-limited top-k, fine-grained routed experts, shared experts, and
auxiliary-loss-free load balancing.

Routing (DeepSeek-V3 sec. 2.1.2): scores s = sigmoid(x W_g^T) in float32. Experts are *selected* on s + b, where b
(`e_score_correction_bias`) is nudged after every optimizer step towards an even load; but the selected experts are
*weighted* by the unbiased s, normalised over the top-k and scaled by `routed_scaling_factor`. With `n_group > 1`
each group is scored by the sum of its two best biased scores and only the best `topk_group` groups compete (on
the real model: a token reaches at most 4 nodes). Nothing is ever dropped.

Routed experts live in two fused tensors (`gate_up_proj` [E, 2I, D], `down_proj` [E, D, I]) so all experts run as
one grouped GEMM (`torch._grouped_mm`) over the tokens sorted by expert; checkpoints store them per expert.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.linear import Linear, bf16_as_fp32, emulate_bf16, linear


class MLP(nn.Module):
    """SwiGLU feed-forward: dense layers and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = config.num_experts_per_tok, config.n_group, config.topk_group
        self.norm_topk_prob, self.scaling = config.norm_topk_prob, config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        # float32 on purpose: increments of 1e-3 vanish in bf16. A buffer, not a parameter: no gradient.
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> (weights [N, k] fp32, expert ids [N, k], scores [N, E], logits [N, E])."""
        logits = linear(x.float(), self.weight.float())  # autocast still rounds to bf16, as transformers does
        scores = logits.sigmoid()
        biased = scores + self.e_score_correction_bias
        if self.n_group > 1 and self.topk_group < self.n_group:
            N, E = biased.shape
            grouped = biased.view(N, self.n_group, E // self.n_group)
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            biased = grouped.masked_fill(~group_mask[..., None], float("-inf")).view(N, E)
        ids = biased.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, ids, scores, logits


# Up to this many rows, CPU inference runs each chosen expert over all the rows (`RoutedExperts._few_rows`). A
# GEMM of 1 to 3 rows costs no more than one row does here (reading the weight bounds it; `linear` lays such
# a product out as MKL streams it fastest), so this needs no gather and no scatter: for a 3-token verify step
# on `tiny`, 1.9x faster than gathering each expert's rows, and 1.3x faster than the grouped GEMM for one
# token, which visits every expert and sorts and scatters rows (measured, 2 threads).
FEW_ROWS = 3


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    # `_grouped_mm`/`bmm` under autocast: run in the autocast dtype like every other matmul in the model.
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of x sorted by expert (counts[e] rows for expert e) times weight[e]^T: one GEMM for all experts."""
    if emulate_bf16(x):
        # No native bf16 GEMM on this CPU: the same bf16-rounded product via float32 kernels (see linear.py).
        with torch.autocast("cpu", enabled=False):
            return grouped_linear(bf16_as_fp32(x), bf16_as_fp32(weight), counts, offsets).to(torch.bfloat16)
    dtype = _matmul_dtype(x)
    x, w = x.to(dtype), weight.to(dtype)
    return _grouped_linear(x, w, counts, offsets)


# Eager even inside a compiled layer: _grouped_mm's shape check rejects float32 while tracing, and the fallback's
# size depends on the data. It is one kernel call either way, so nothing is lost.
@torch.compiler.disable
def _grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    if grouped_mm_supported(x, w):
        return torch._grouped_mm(x, w.transpose(1, 2), offs=offsets)
    # Fallback: scatter the rows into a zero-padded [E, rows, in] block and use one batched matmul. No host sync
    # but the longest expert's row count, and none at all while a CUDA graph records (then pad to every row).
    E, N = w.shape[0], x.shape[0]
    idx = torch.arange(N, device=x.device)
    expert = torch.searchsorted(offsets.long(), idx, right=True)  # expert e holds rows offsets[e-1]..offsets[e]-1
    row = idx - (offsets - counts)[expert]
    rows = N if x.is_cuda and torch.cuda.is_current_stream_capturing() else int(counts.max()) if N else 0
    padded = x.new_zeros(E, rows, x.shape[1])
    padded[expert, row] = x
    return torch.bmm(padded, w.transpose(1, 2))[expert, row]


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    # torch >= 2.9 ships a CPU fallback for _grouped_mm; CUDA needs SM90+ for bf16. Strides must be 16-byte aligned.
    if not hasattr(torch, "_grouped_mm") or x.dtype not in (torch.bfloat16, torch.float32, torch.float16):
        return False
    if x.is_cuda and (x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device)[0] < 9):
        return False
    align = 16 // x.element_size()
    return x.shape[1] % align == 0 and w.shape[1] % align == 0


class RoutedExperts(nn.Module):
    # Set by nanoseek.train.distributed.apply_expert_parallel: this rank then holds E / ep of the experts (the
    # fused tensors become DTensors sharded on dim 0) and tokens travel to their experts with all_to_all.
    ep_group: dist.ProcessGroup | None = None

    def __init__(self, config: ModelConfig):
        super().__init__()
        E, D, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))  # rows: gate then up, as transformers v5
        self.down_proj = nn.Parameter(torch.empty(E, D, I))

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        N, k = ids.shape
        flat = ids.reshape(-1)
        if (N <= FEW_ROWS and x.device.type == "cpu" and not torch.is_grad_enabled()
                and type(self)._mlp is RoutedExperts._mlp and self.ep_group is None):  # (FP8 subclasses: grouped)
            return self._few_rows(x, ids, weights)
        order = flat.argsort(stable=True)  # (token, slot) pairs sorted by expert
        token = order // k
        if self.ep_group is not None:
            out = self._expert_parallel(x[token], flat, order)
        else:
            out = self._mlp(x[token], expert_counts(flat, self.gate_up_proj.shape[0]), self.gate_up_proj,
                            self.down_proj)
        out = out * weights.reshape(-1)[order, None].to(out.dtype)
        return torch.zeros_like(x, dtype=out.dtype).index_add_(0, token, out).to(x.dtype)

    @torch.compiler.disable  # a loop driven by the host (which experts): nothing to compile
    def _few_rows(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """CPU inference on a few rows, as when decoding or verifying drafts for one sequence: each chosen expert
        runs once, its weights used in place, over all the rows; a row that did not choose it weighs it zero."""
        dtype, out_dtype = _matmul_dtype(x), x.dtype
        x, out = x.to(dtype), torch.zeros(x.shape, dtype=dtype, device=x.device)
        gate_weights = torch.zeros(x.shape[0], self.gate_up_proj.shape[0], dtype=dtype, device=x.device)
        gate_weights.scatter_add_(1, ids, weights.to(dtype))  # [rows, experts]
        for e in sorted(set(ids.view(-1).tolist())):
            gate, up = linear(x, self.gate_up_proj[e].to(dtype)).chunk(2, dim=-1)
            # (the gate weight scales the activation: the down projection's output is the expert's share)
            out += linear(F.silu(gate).mul_(up).mul_(gate_weights[:, e, None]), self.down_proj[e].to(dtype))
        return out.to(out_dtype)

    @staticmethod
    def _mlp(x: torch.Tensor, counts: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """SwiGLU of every expert over rows sorted by expert (counts[e] rows for expert e)."""
        offsets = counts.cumsum(0).to(torch.int32)
        gate, up = grouped_linear(x, gate_up, counts, offsets).chunk(2, dim=-1)
        return grouped_linear((F.silu(gate) * up).contiguous(), down, counts, offsets)

    def _expert_parallel(self, rows: torch.Tensor, flat: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """rows sorted by global expert id -> their expert outputs, in the same order, computed where the experts
        live. Experts are owned in contiguous blocks (rank j: [j n, (j+1) n)), so sorted by expert is also
        sorted by destination rank: exchange counts, then rows; regroup the rows we got expert-major for the
        grouped GEMM; undo that and send the outputs back along the reverse exchange."""
        group = self.ep_group
        gate_up, down = _local(self.gate_up_proj), _local(self.down_proj)
        ep, n = dist.get_world_size(group), gate_up.shape[0]
        send_counts = torch.bincount(flat, minlength=ep * n)  # rows for each global expert
        recv_counts = torch.empty_like(send_counts)  # [source rank, my expert] rows coming to me
        dist.all_to_all_single(recv_counts, send_counts, group=group)
        send_splits = send_counts.view(ep, n).sum(1).tolist()
        recv_splits = recv_counts.view(ep, n).sum(1).tolist()
        received = _AllToAll.apply(rows, recv_splits, send_splits, group)  # by source rank, then expert
        expert = torch.arange(n, device=rows.device).repeat(ep).repeat_interleave(recv_counts)
        perm = expert.argsort(stable=True)
        out = self._mlp(received[perm], recv_counts.view(ep, n).sum(0), gate_up, down)
        out = out[perm.argsort()]  # back to source-rank order
        return _AllToAll.apply(out, send_splits, recv_splits, group)


def expert_counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens per expert. `bincount` would do, but its output size depends on the data, which torch.compile
    cannot trace; this is the same count with a fixed size."""
    return torch.zeros(num_experts, dtype=torch.long, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))


def _local(w: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor parameter (its experts); a plain tensor as is. Differentiable."""
    return w.to_local() if hasattr(w, "to_local") else w


class _AllToAll(torch.autograd.Function):
    """`all_to_all_single` with uneven splits along dim 0; the gradient goes back along the reverse exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(grad.contiguous(), in_splits, out_splits, ctx.group), None, None, None


class MoE(nn.Module):
    """Routed + shared experts. While training it counts tokens per expert for the bias update."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.gate = Router(config)
        self.experts = RoutedExperts(config)
        if config.n_shared_experts > 0:
            self.shared_experts = MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
        self.register_buffer("load_counts", torch.zeros(config.n_routed_experts), persistent=False)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        weights, ids, scores, logits = self.gate(flat)
        y = self.experts(flat, ids, weights)
        if hasattr(self, "shared_experts"):
            y = y + self.shared_experts(flat)
        if self.training:
            with torch.no_grad():
                self.load_counts += torch.bincount(ids.reshape(-1), minlength=self.load_counts.numel()).float()
            self.aux_loss = self._aux_loss(scores.view(B, T, -1), ids.view(B, T, -1), logits)
        return y.view(B, T, D)

    def _aux_loss(self, scores: torch.Tensor, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
        """Optional: DeepSeek-V3's sequence-wise balance loss and the router z-loss (both off by default)."""
        cfg, loss = self.config, None
        if cfg.seq_aux_loss_alpha > 0:
            E, k, T = cfg.n_routed_experts, cfg.num_experts_per_tok, scores.shape[1]
            chosen = torch.zeros_like(scores).scatter_(2, ids, 1.0)  # [B, T, E]
            f = chosen.sum(dim=1) * E / (k * T)  # per sequence: load relative to uniform
            p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)
            loss = cfg.seq_aux_loss_alpha * (f * p).sum(dim=-1).mean()
        if cfg.router_z_loss_coeff > 0:
            z = cfg.router_z_loss_coeff * torch.logsumexp(logits, dim=-1).pow(2).mean()
            loss = z if loss is None else loss + z
        return loss

    @torch.no_grad()
    def update_bias(self, group: dist.ProcessGroup | None = None) -> dict[str, float]:
        """The aux-loss-free step: b_i += gamma * sign(mean load - load_i); then reset the counts.

        The counts cover everything since the last call (all micro-batches of one optimizer step) and are summed
        over ranks first, so every rank applies the identical update and the bias stays in sync.
        """
        counts = self.load_counts
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts, group=group)
        mean = counts.mean()
        stats = {"load_max_over_mean": float(counts.max() / mean) if mean > 0 else 0.0}
        if self.config.bias_update_speed > 0 and mean > 0:
            self.gate.e_score_correction_bias += self.config.bias_update_speed * torch.sign(mean - counts)
        stats["bias_norm"] = float(self.gate.e_score_correction_bias.norm())
        counts.zero_()
        return stats
