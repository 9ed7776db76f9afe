"""Linear layers whose bf16 matmuls stay fast on CPUs without a native bf16 GEMM, and whose few-row float32
products (decoding, verifying drafts) take the faster of torch's two CPU GEMM layouts.

Under bf16 autocast torch rounds a matmul's inputs to bf16 and calls its bf16 GEMM. On x86 CPUs without
AVX512-BF16 or AMX (most laptops; AMD Zen 2/3) oneDNN cannot run bf16, and torch falls back to a reference kernel
that is 3-70x slower than its float32 GEMM on the same machine: a CPU speedrun would spend nearly all its time there.
A bf16 GEMM accumulates in float32 anyway, so we compute the same product (inputs rounded to bf16, float32
accumulation, output rounded to bf16) with the fast float32 kernel. Backward goes through the same casts, so
gradients are rounded to bf16 exactly where autocast would round them. Everywhere else (GPUs, CPUs with native
bf16, float32 runs) `linear` is plain `F.linear`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def _cpu_has_bf16_gemm() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: assume the slow path
        return False


def emulate_bf16(x: torch.Tensor) -> bool:
    """True when a bf16-autocast matmul on x would hit torch's slow CPU bf16 kernel."""
    return (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and not _cpu_has_bf16_gemm())


def bf16_as_fp32(t: torch.Tensor) -> torch.Tensor:
    """Round to bf16 (what autocast would feed the GEMM), held in float32 for the fast kernel."""
    return t.to(torch.bfloat16).float()


# A CPU product of 2 to 4 rows (a decode step that verifies drafts, an MTP module over its new pairs) with an input
# of at most this many features runs as (W x^T)^T: the weight is the GEMM's left operand and x^T its few columns.
# Reading the weight bounds such a product, and torch's CPU GEMM (MKL) streams it 2-3x faster laid out this way
# than as x W^T (torch 2.13 CPU, AMD EPYC, one thread: a 384x384 weight, 3 rows: 46 us against 102 us; 2048x512:
# 325 against 836). One row stays on F.linear, which is as fast there. Past 1024 input features x W^T is faster
# (a 384x1536 weight, 3 rows: 455 against 346 us); past 4 rows the two trade places from shape to shape.
FEW_ROWS_IN_FEATURES = 1024


def weight_stationary(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when `linear(x, weight)` should run as (W x^T)^T (see above): CPU float32 inference on 2-4 rows."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_grad_enabled() and 2 <= x.numel() // x.shape[-1] <= 4
            and x.shape[-1] <= FEW_ROWS_IN_FEATURES)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if weight_stationary(x, weight):
        rows = x.reshape(-1, x.shape[-1]).contiguous()  # (x^T as a transposed view: MKL's fast case)
        out = torch.mm(weight, rows.t()).t().contiguous()
        return (out if bias is None else out + bias).view(*x.shape[:-1], weight.shape[0])
    if not emulate_bf16(x):
        return F.linear(x, weight, bias)
    with torch.autocast("cpu", enabled=False):
        out = F.linear(bf16_as_fp32(x), bf16_as_fp32(weight), None if bias is None else bf16_as_fp32(bias))
    return out.to(torch.bfloat16)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same state_dict keys) routed through `linear` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
