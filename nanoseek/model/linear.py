"""Linear layers whose bf16 matmuls stay fast on CPUs without a native bf16 GEMM.

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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if not emulate_bf16(x):
        return F.linear(x, weight, bias)
    with torch.autocast("cpu", enabled=False):
        out = F.linear(bf16_as_fp32(x), bf16_as_fp32(weight), None if bias is None else bf16_as_fp32(bias))
    return out.to(torch.bfloat16)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same state_dict keys) routed through `linear` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
