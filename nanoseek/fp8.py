"""Blockwise FP8 (DeepSeek-V3's recipe): float8_e4m3fn values with fine-grained float32 scales.

Read top to bottom:

1. Quantisation. One function, `quantize(x, block)`, for every granularity the recipe uses: activations and
   output gradients per 1x128 tile (one token x 128 channels), weights per 128x128 block. scale = amax / 448
   (optionally rounded up to a power of two, V3.1's `ue8m0`). Edges that are not a multiple of the block are
   zero-padded for the amax and cropped after, so a partial block simply has fewer elements.
2. The FP8 GEMM `fp8_mm(a, b) = a @ b^T` with both operands quantised along the contraction dim K. On Hopper with
   a torch whose `_scaled_mm` accepts blockwise float32 scales it runs on FP8 tensor cores (probed once per
   device against the emulation); everywhere else it *emulates*: dequantise both operands and multiply in
   float32 (the CPU has no fast bf16). Same quantised operands, same fp32 accumulation: the same numbers up to
   summation order.
3. `FP8Linear`: an nn.Linear whose three GEMMs (forward, input gradient, weight gradient) take FP8 operands.
   Master weights, gradients and optimizer state stay fp32. `FP8RoutedExperts` does the same for the fused
   routed experts (grouped GEMM). `convert_to_fp8_training(model)` swaps them in; state_dict keys do not change.
4. `memory_report`: bytes per parameter of weights, gradients, AdamW state and measured saved activations for
   fp32, bf16 and fp8 runs.

Serving with FP8 weights in memory and `nanoseek convert` live in `nanoseek.fp8_infer`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.moe import RoutedExperts, grouped_linear

BLOCK = 128
FP8 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(FP8).max  # 448
TILE = (1, BLOCK)  # activations and output gradients: one row x 128 columns along the contraction dim
WEIGHT_BLOCK = (BLOCK, BLOCK)


# ============================================================================ 1. quantisation
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _scale_from_amax(amax: torch.Tensor, pow2_scales: bool) -> torch.Tensor:
    # An all-zero block gets a tiny positive scale (its values quantise to 0) instead of a division by zero.
    scale = amax.float().clamp(min=1e-12) / E4M3_MAX
    if pow2_scales:  # round *up* so amax / scale stays <= 448: no saturation, at most one bit of range lost
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return scale


@dataclass
class QTensor:
    """FP8 values [..., R, C] and one fp32 scale per (block[0] x block[1]) block [..., ceil(R/b0), ceil(C/b1)].
    The real value is data * scale (the scale is a multiplier: the checkpoint's `weight_scale_inv`)."""

    data: torch.Tensor
    scale: torch.Tensor
    block: tuple[int, int]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        values = fp8_to_float(self.data)
        *lead, R, C = values.shape
        b0, b1 = self.block
        if R % b0 or C % b1:  # partial edge blocks: spell the scale out per element
            return (values * expand_scale(self.scale, values.shape, self.block)).to(dtype)
        blocks = values.reshape(*lead, R // b0, b0, C // b1, b1) * self.scale[..., :, None, :, None]
        return blocks.reshape(*lead, R, C).to(dtype)

    def t(self) -> "QTensor":
        """The transpose. A 128x128 block grid transposes into a 128x128 block grid, which is why weights can
        serve as the B operand of both the forward (W) and the input-gradient GEMM (W^T) from one quantisation;
        a 1x128 tile does not (it becomes 128x1), which is why activations are quantised twice (see FP8Linear)."""
        return QTensor(self.data.transpose(-1, -2), self.scale.transpose(-1, -2), self.block[::-1])


def fp8_to_float(data: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn -> float32, exactly. On CPU torch's own cast costs ~9 ns an element, more than the GEMM it feeds
    in the emulation; placing the e4m3 bits (S EEEE MMM) into a float16 (S EEEEE MMMMMMMMMM) gives the same value
    times 2^-8, subnormals included, and float16 -> float32 is vectorised: four times faster. The two NaN codes
    (S 1111 111) would read as +-480, so they are restored."""
    if data.device.type != "cpu":
        return data.float()
    bits = data.view(torch.uint8).to(torch.int16)
    magnitude = bits & 0x7F
    half = ((bits & 0x80) << 8) | (magnitude << 7)
    values = half.view(torch.float16).float() * 256.0
    return values.masked_fill_(magnitude == 0x7F, float("nan"))


def expand_scale(scale: torch.Tensor, shape: torch.Size, block: tuple[int, int]) -> torch.Tensor:
    """Per-block scales [..., ceil(R/b0), ceil(C/b1)] -> per-element [..., R, C] (edge blocks are partial)."""
    s = scale.repeat_interleave(block[0], -2) if block[0] > 1 else scale
    s = s.repeat_interleave(block[1], -1) if block[1] > 1 else s
    return s[..., : shape[-2], : shape[-1]]


def quantize(x: torch.Tensor, block: tuple[int, int] = TILE, pow2_scales: bool = False) -> QTensor:
    """x [..., R, C] -> QTensor with scale = amax / 448 per block (computed in fp32 whatever x's dtype)."""
    *lead, R, C = x.shape
    b0, b1 = block
    pr, pc = _cdiv(R, b0) * b0, _cdiv(C, b1) * b1
    xf = x.float()
    if (pr, pc) != (R, C):  # zeros never raise an amax, so padding leaves every block's scale unchanged
        xf = F.pad(xf, (0, pc - C, 0, pr - R))
    blocks = xf.reshape(*lead, pr // b0, b0, pc // b1, b1)
    scale = _scale_from_amax(blocks.abs().amax(dim=(-3, -1)), pow2_scales)
    q = (blocks / scale[..., :, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX)  # e4m3fn has no inf: clamp, never NaN
    q = q.reshape(*lead, pr, pc)[..., :R, :C].to(FP8)
    return QTensor(q, scale, block)


def fake_quantize(x: torch.Tensor, block: tuple[int, int] = TILE, pow2_scales: bool = False) -> torch.Tensor:
    """quantise then dequantise, in fp32: the value an FP8 GEMM actually multiplies."""
    return quantize(x, block, pow2_scales).dequantize(torch.float32)


def dequantize_blockwise(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32,
                         block: int = BLOCK) -> torch.Tensor:
    """W = block value x `weight_scale_inv` (a multiplier, despite its name). Used by checkpoint loading."""
    expected = (_cdiv(weight.shape[-2], block), _cdiv(weight.shape[-1], block))
    if tuple(scale_inv.shape[-2:]) != expected:
        raise ValueError(f"FP8 scale has shape {list(scale_inv.shape)} but weight {list(weight.shape)} needs "
                         f"{list(expected)} for {block}x{block} blocks")
    return QTensor(weight, scale_inv.float(), (block, block)).dequantize(torch.float32).to(dtype)


def quantize_blockwise(weight: torch.Tensor, block: int = BLOCK, pow2_scales: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """W [m, n] -> (float8_e4m3fn [m, n], scale_inv [ceil(m/b), ceil(n/b)]): the official checkpoint format."""
    q = quantize(weight, (block, block), pow2_scales)
    return q.data, q.scale


def fake_quantize_token_tiles(x: torch.Tensor, counts: torch.Tensor | None = None,
                              pow2_scales: bool = False) -> torch.Tensor:
    """x [T, C] fake-quantised in 128x1 tiles (128 consecutive tokens x one channel) that never cross a segment.

    For weight gradients the contraction runs over tokens, so the scales must be constant along 128 tokens. With
    routed experts the rows are sorted by expert and `counts[e]` rows belong to expert e: a tile must not mix two
    experts (they are different GEMMs), so tiles restart at every segment boundary.
    """
    T, C = x.shape
    if counts is None:
        return fake_quantize(x.t(), TILE, pow2_scales).t()
    counts = counts.to(torch.long)
    starts = counts.cumsum(0) - counts
    tiles_per = (counts + BLOCK - 1) // BLOCK
    first_tile = tiles_per.cumsum(0) - tiles_per
    seg = torch.repeat_interleave(torch.arange(len(counts), device=x.device), counts)
    tile = first_tile[seg] + (torch.arange(T, device=x.device) - starts[seg]) // BLOCK
    xf = x.float()
    amax = torch.zeros(int(tiles_per.sum()), C, device=x.device)
    amax.scatter_reduce_(0, tile[:, None].expand(T, C), xf.abs(), "amax", include_self=True)
    scale = _scale_from_amax(amax, pow2_scales)[tile]
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8).float() * scale


# ============================================================================ 2. the FP8 GEMM
# Per device: None (emulate) or how `_scaled_mm` wants a 128x128-block operand's scales laid out (see below).
_KERNEL_LAYOUT: dict[tuple[str, int | None], int | None] = {}
# Candidate layouts of b's [N/128, K/128] block scales, as handed to `_scaled_mm` (which multiplies a @ b^T):
# torch releases have disagreed on the shape and the stride order they expect, so each one is probed. The last
# hands each block's scale to every one of its 128 rows as 1x128 tile scales: the same numbers (a 128x128 block
# is 128 tiles sharing one scale), for a torch whose 128x128 mode is missing or wrong (torch 2.11 on an H100).
_BLOCK_SCALE_LAYOUTS = (
    lambda s, n: s.contiguous().t(),  # [K/128, N/128], N-major
    lambda s, n: s.t().contiguous(),  # [K/128, N/128], K-major
    lambda s, n: s.contiguous(),  # [N/128, K/128], K-major
    lambda s, n: s.t().contiguous().t(),  # [N/128, K/128], N-major
    lambda s, n: s.repeat_interleave(BLOCK, dim=0)[:n].t().contiguous(),  # as 1x128 tiles: [K/128, N]
)


def _scaled_mm_blockwise(a: QTensor, b: QTensor, out_dtype: torch.dtype, layout: int = 0) -> torch.Tensor:
    """a [M, K] (1x128 tiles) @ b [N, K]^T (128x128 blocks or 1x128 tiles) on FP8 tensor cores.

    cuBLAS wants b column-major and a's [M, K/128] scales "outer-dim major" (stride (1, M)), likewise b's 1x128
    scales; b's 128x128 scales go in the probed `layout`."""
    scale_a = a.scale.t().contiguous().t()
    if b.block == WEIGHT_BLOCK:
        scale_b = _BLOCK_SCALE_LAYOUTS[layout](b.scale, b.data.shape[0])
    else:
        scale_b = b.scale.t().contiguous()
    return torch._scaled_mm(a.data.contiguous(), b.data.contiguous().t(), scale_a=scale_a, scale_b=scale_b,
                            out_dtype=out_dtype)


def _kernel_layout(device: torch.device) -> int | None:
    """Hopper + a torch whose `_scaled_mm` takes fp32 1x128/128x128 scales: probed once per device by comparing
    with the emulation, layout by layout, so a torch that rejects these scales (or wants another layout) falls
    back safely. Returns the 128x128 scale layout to use, or None to emulate."""
    key = (device.type, device.index)
    if key not in _KERNEL_LAYOUT:
        found = None
        hopper = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)
        if hopper and hasattr(torch, "_scaled_mm"):
            g = torch.Generator(device=device).manual_seed(0)
            aq = quantize(torch.randn(256, 384, device=device, generator=g), TILE)
            w = torch.randn(512, 384, device=device, generator=g)  # N/128 = 4, K/128 = 3: a transpose shows
            exact = [(b, aq.dequantize() @ b.dequantize().t()) for b in (quantize(w, WEIGHT_BLOCK), quantize(w, TILE))]
            for layout in range(len(_BLOCK_SCALE_LAYOUTS)):
                try:
                    if all(_close(_scaled_mm_blockwise(aq, bq, torch.float32, layout), ref) for bq, ref in exact):
                        found = layout
                        break
                except (RuntimeError, TypeError, ValueError, NotImplementedError):
                    continue
        _KERNEL_LAYOUT[key] = found
    return _KERNEL_LAYOUT[key]


def _close(got: torch.Tensor, ref: torch.Tensor) -> bool:
    return bool(((got - ref).norm() / ref.norm()) < 1e-3)


def _kernel_available(device: torch.device) -> bool:
    return _kernel_layout(device) is not None


def emulation_dtype(device: torch.device) -> torch.dtype:
    """The dtype the emulation multiplies in: fp32 on CPU (no native bf16 here; exact for e4m3 x fp32 scale),
    bf16 on GPUs without the kernel (what DeepSeek's own fallback GEMM does)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def fp8_mm(a: QTensor, b: QTensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a [M, K] @ b [N, K]^T -> [M, N] in out_dtype, both operands FP8 with scales constant along 128 of K."""
    M, K = a.data.shape
    N = b.data.shape[0]
    if a.data.is_cuda and K % BLOCK == 0 and M % 16 == 0 and N % 16 == 0 and _kernel_available(a.data.device):
        return _scaled_mm_blockwise(a, b, out_dtype, _kernel_layout(a.data.device))
    dt = emulation_dtype(a.data.device)
    return (a.dequantize(dt) @ b.dequantize(dt).t()).to(out_dtype)


@contextlib.contextmanager
def _no_autocast(device: torch.device):
    # Our GEMMs choose their own dtypes; autocast must not re-cast the fp32 emulation to bf16 behind our back.
    with torch.autocast(device.type, enabled=False):
        yield


def _activation_dtype(x: torch.Tensor) -> torch.dtype:
    """What an FP8 GEMM emits: the autocast dtype (bf16, the recipe) under autocast, on a GPU or in the CPU
    emulation alike, so that both compute the same numbers; else the input's dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# ============================================================================ 3. FP8 linear layers for training
class _FP8LinearFunction(torch.autograd.Function):
    """Y = X W^T, dX = dY W, dW = dY^T X; every GEMM has FP8 operands quantised along its own contraction dim.

    fprop  (K = in):     X in 1x128 tiles along `in`,      W in 128x128 blocks.
    dgrad  (K = out):    dY in 1x128 tiles along `out`,    W^T: the same 128x128 blocks, transposed.
    wgrad  (K = tokens): dY^T and X^T in 1x128 tiles along *tokens* (128x1 tiles of dY and X). The scale must be
                         constant along K for the accumulator to apply it once per 128-slice, and here K is the
                         token dim, so the forward's channel-wise tiles cannot be reused: X is quantised a second
                         time along tokens and *that* FP8 copy is what is saved for backward (1 byte/element
                         instead of 2 or 4: the recipe's activation-memory saving).
    W is re-quantised in backward from the fp32 master (deterministic, so identical) instead of being saved.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, pow2_scales: bool) -> torch.Tensor:
        out_dtype = _activation_dtype(x)
        with _no_autocast(x.device):
            x2 = x.reshape(-1, x.shape[-1])
            y = fp8_mm(quantize(x2, TILE, pow2_scales), quantize(weight, WEIGHT_BLOCK, pow2_scales), out_dtype)
            xt = quantize(x2.t(), TILE, pow2_scales)  # [in, tokens]: the 128x1 tiles wgrad needs
        ctx.save_for_backward(weight, xt.data, xt.scale)
        ctx.pow2, ctx.x_dtype, ctx.x_shape = pow2_scales, x.dtype, x.shape
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        weight, xt_data, xt_scale = ctx.saved_tensors
        p2 = ctx.pow2
        with _no_autocast(dy.device):
            dy2 = dy.reshape(-1, dy.shape[-1])
            w = quantize(weight, WEIGHT_BLOCK, p2)
            dx = fp8_mm(quantize(dy2, TILE, p2), w.t(), ctx.x_dtype) if ctx.needs_input_grad[0] else None
            dw = None
            if ctx.needs_input_grad[1]:
                dw = fp8_mm(quantize(dy2.t(), TILE, p2), QTensor(xt_data, xt_scale, TILE), torch.float32)
                dw = dw.to(weight.dtype)  # fp32 master weight -> fp32 gradient
        return (dx.view(ctx.x_shape) if dx is not None else None), dw, None


class FP8Linear(nn.Linear):
    """nn.Linear with FP8 GEMMs. Same parameters, same state_dict, same init: only the arithmetic changes."""

    pow2_scales: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _FP8LinearFunction.apply(x, self.weight, self.pow2_scales)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class _FP8GroupedFunction(torch.autograd.Function):
    """The routed experts' grouped GEMM (rows sorted by expert, weight [E, N, K]) with FP8 operands.

    Emulated everywhere: torch has no `_scaled_grouped_mm` on CPU, and on GPU its blockwise variant is not yet a
    stable API; so the quantised operands are dequantised and handed to the ordinary grouped GEMM. Numerically
    this is the recipe (1x128 activations, 128x128 blocks per expert, 128-token tiles per expert for wgrad);
    on Hopper it saves memory but not time.
    """

    @staticmethod
    def forward(ctx, x, weight, counts, offsets, pow2_scales):
        out_dtype = _activation_dtype(x)
        dt = emulation_dtype(x.device)
        with _no_autocast(x.device):
            xq = fake_quantize(x, TILE, pow2_scales).to(dt)
            wq = quantize(weight, WEIGHT_BLOCK, pow2_scales).dequantize(dt)
            y = grouped_linear(xq, wq, counts, offsets).to(out_dtype)
        ctx.save_for_backward(x, weight, counts, offsets)
        ctx.pow2 = pow2_scales
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, counts, offsets = ctx.saved_tensors
        p2, dt = ctx.pow2, emulation_dtype(dy.device)
        with _no_autocast(dy.device):
            dyq = fake_quantize(dy, TILE, p2).to(dt)
            wq = quantize(weight, WEIGHT_BLOCK, p2).dequantize(dt)
            dx = grouped_linear(dyq, wq.transpose(1, 2).contiguous(), counts, offsets).to(x.dtype)
            dy_t = fake_quantize_token_tiles(dy, counts, p2)
            x_t = fake_quantize_token_tiles(x, counts, p2)
            dw = torch.zeros_like(weight, dtype=torch.float32)
            start = 0
            for e, n in enumerate(counts.tolist()):  # per expert: contraction over its own tokens only
                if n:
                    dw[e] = dy_t[start:start + n].t() @ x_t[start:start + n]
                start += n
        return dx, dw.to(weight.dtype), None, None, None


class FP8RoutedExperts(RoutedExperts):
    """Routed experts whose grouped GEMMs use FP8 operands (same fused parameters, same state_dict). Overrides
    the experts' one SwiGLU step `_mlp`, so expert parallelism (which calls it with this rank's experts) works."""

    pow2_scales: bool = False

    def _mlp(self, x, counts, gate_up, down):
        offsets = counts.cumsum(0).to(torch.int32)
        gate, up = _FP8GroupedFunction.apply(x, gate_up, counts, offsets, self.pow2_scales).chunk(2, dim=-1)
        return _FP8GroupedFunction.apply((F.silu(gate) * up).contiguous(), down, counts, offsets, self.pow2_scales)


def fp8_eligible(name: str, module: nn.Module) -> bool:
    """The recipe keeps the embedding, output head, router, norms and attention core in high precision; every
    other linear (MLA projections, dense MLP, shared experts, MTP's eh_proj) computes in FP8. The router is a
    bare Parameter and attention is SDPA, so only `lm_head` needs excluding by name."""
    return (isinstance(module, nn.Linear) and not isinstance(module, FP8Linear)
            and not name.endswith(("lm_head", "shared_head.head")))


def convert_to_fp8_training(model: nn.Module, pow2_scales: bool = False, experts: bool = True) -> nn.Module:
    """Make `model` train with FP8 GEMMs, in place. The modules keep their identity and Parameters (only their
    class changes), so an optimizer built before or after, state_dict keys and checkpoints are all unaffected.
    Call it once after building (or loading) the model: pretrain does for `--fp8`, SFT and GRPO should too."""
    for name, m in model.named_modules():
        if fp8_eligible(name, m) or (experts and type(m) is RoutedExperts):
            m._fp8_base_class = type(m)  # to revert to (nn.Linear or nanoseek.model.linear.Linear)
            m.__class__ = FP8Linear if isinstance(m, nn.Linear) else FP8RoutedExperts
            m.pow2_scales = pow2_scales
    return model


def revert_fp8_training(model: nn.Module) -> nn.Module:
    """Undo `convert_to_fp8_training` (same parameters, high-precision arithmetic again)."""
    for m in model.modules():
        if isinstance(m, (FP8Linear, FP8RoutedExperts)):
            m.__class__ = m.__dict__.pop("_fp8_base_class")
    return model


def is_fp8_training(model: nn.Module) -> bool:
    return any(isinstance(m, (FP8Linear, FP8RoutedExperts)) for m in model.modules())


# ============================================================================ 4. memory per parameter
def saved_activation_bytes(model: nn.Module, precision: str, tokens: int = 128) -> float:
    """Bytes saved for backward per token, measured on one real forward with `saved_tensors_hooks`.

    Tensors that share storage with a parameter (a weight saved by F.linear) are not activations and are left
    out; every other storage is counted once. The model's training-time state (MoE load counts) is restored.
    """
    was_fp8 = is_fp8_training(model)
    if precision == "fp8" and not was_fp8:
        convert_to_fp8_training(model)
    elif precision != "fp8" and was_fp8:
        revert_fp8_training(model)
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in param_storages and t.device.type != "meta":
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    device = next(model.parameters()).device
    counts = {n: b.clone() for n, b in model.named_buffers() if n.endswith("load_counts")}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens + 1), generator=g).to(device)
    mode = model.training
    model.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision in ("bf16", "fp8") \
        else contextlib.nullcontext()
    try:
        with torch.enable_grad(), autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = model.loss(ids[:, :-1], ids[:, 1:])
        del loss
    finally:
        model.train(mode)
        for n, b in counts.items():
            model.get_buffer(n).copy_(b)
        if was_fp8 and precision != "fp8":
            convert_to_fp8_training(model)
        elif not was_fp8 and precision == "fp8":
            revert_fp8_training(model)
    return sum(seen.values()) / tokens


def memory_report(model: nn.Module, tokens_per_step: int | None = None,
                  precisions: tuple[str, ...] = ("fp32", "bf16", "fp8"), probe_tokens: int = 128) -> str:
    """A table of bytes per parameter for weights, gradients, AdamW state (m, v), plus measured saved
    activations per token (and per parameter at `tokens_per_step` tokens per micro-batch).

    As trained here: fp32 master weights and gradients in every mode (bf16 = autocast; fp8 = FP8 GEMM operands
    made on the fly from the fp32 masters, so the transient FP8 weight copy, 1 byte per FP8 parameter, is listed
    apart), AdamW m and v in fp32 (DeepSeek keeps them in bf16: 4 bytes instead of 8)."""
    n = sum(p.numel() for p in model.parameters())
    n_fp8 = sum(m.weight.numel() for name, m in model.named_modules()
                if fp8_eligible(name, m) or isinstance(m, FP8Linear))
    n_fp8 += sum(m.gate_up_proj.numel() + m.down_proj.numel() for m in model.modules()
                 if isinstance(m, RoutedExperts))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) / n
    lines = [f"memory per parameter ({n / 1e6:.2f}M parameters, {n_fp8 / n:.0%} of them in FP8 GEMMs under fp8; "
             f"activations measured on a {probe_tokens}-token forward):",
             f"  {'run':5s} {'weights':>8s} {'grads':>6s} {'AdamW':>6s} {'total':>6s}  {'act B/token':>11s}"
             + (f"  {'act B/param':>11s}" if tokens_per_step else "")]
    for precision in precisions:
        act = saved_activation_bytes(model, precision, probe_tokens)
        extra = n_fp8 / n if precision == "fp8" else 0.0  # the transient FP8 weight copy
        w, g, o = weight_bytes + extra, 4.0, 8.0
        row = f"  {precision:5s} {w:8.2f} {g:6.2f} {o:6.2f} {w + g + o:6.2f}  {act:11,.0f}"
        if tokens_per_step:
            row += f"  {act * tokens_per_step / n:11.2f}"
        lines.append(row)
    return "\n".join(lines)


def _selfcheck() -> None:  # pragma: no cover - `python -m nanoseek.fp8` prints the kernel choice on this machine
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"{dev}: {'FP8 tensor-core kernel (_scaled_mm, blockwise)' if _kernel_available(dev) else 'emulation'}"
          f"; torch {torch.__version__}")


if __name__ == "__main__":  # pragma: no cover
    _selfcheck()
