"""Scaling out with PyTorch's own distributed stack: torchrun, FSDP2, expert parallelism, sharded checkpoints.

    torchrun --nproc_per_node 8 -m nanoseek pretrain --preset d12 --run runs/d12 --steps 5000 --ep-size 8

Every function here is a no-op (or the obvious single-process equivalent) when the process was not started by
torchrun, so the one training loop runs unchanged as one CPU process and as N ranks.

Layout with W ranks and expert-parallel size e (e divides W and the number of routed experts E):

    mesh ("dp", "ep") of shape (W / e, e); ranks r..r+e-1 (consecutive, so on one node) form one EP group.
    dense parameters (attention, norms, router, shared experts, embedding, head): FSDP2 over all W ranks.
    routed experts: EP rank j of a group holds experts [j E/e, (j+1) E/e) -- a DTensor sharded on dim 0 over
        "ep" -- and FSDP2 shards those further over "dp" (the W/e ranks holding the same experts). Tokens travel
        to their experts and back with all_to_all (nanoseek.model.moe.RoutedExperts, when `ep_group` is set).

Gradients: FSDP averages dense gradients over W ranks. An expert's gradient already sums the contributions of
the e ranks of its EP group (the backward of the all_to_all brings them home), so it is reduced over "dp" only
and divided by W, not W / e: every parameter then gets the gradient of the mean loss over all W ranks, as one
process would with the same global batch. The aux-loss-free bias update all-reduces the expert load over all
ranks (MoE.update_bias), so the bias stays identical everywhere.

Checkpoints are `torch.distributed.checkpoint` (DCP) directories: each rank writes its own shards, and a
checkpoint written at one world size (or EP size) loads at another, DCP resharding on load.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from nanoseek.checkpoint import atomic_directory, save_model
from nanoseek.model.transformer import DeepseekV3ForCausalLM

T = TypeVar("T")


# ============================================================================ process group
def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def init_distributed(device: str | torch.device | None = None) -> torch.device:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); return the
    device this rank should use. NCCL with one GPU per rank (cuda:LOCAL_RANK) on GPUs, gloo on CPU.

    Without torchrun (no WORLD_SIZE, or 1) nothing is initialised and the device is `device`, else cuda if
    available, else cpu. Calling it again is harmless.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if world <= 1 and not is_distributed():
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not is_distributed():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
        atexit.register(cleanup)
    return device


def cleanup() -> None:
    """Leave the process group (safe to call twice, or without one)."""
    if is_distributed():
        dist.destroy_process_group()


# ============================================================================ small collectives
def run_on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only (writing files, building data), then let every rank continue.

    Rank 0's return value is broadcast to all ranks (so keep it small and picklable); if `fn` raised, every
    rank raises the same exception, so a bad input ends all ranks with one clear message instead of a hang.
    """
    if not is_distributed():
        return fn()
    box: list[Any] = [None]
    if is_main():
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            box[0] = ("error", e)
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise value
    return value


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: T) -> list[T]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects, e.g. rewards and their metadata)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_tensor(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor of the same shape from every rank along dim 0 (no gradient)."""
    if not is_distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def all_reduce_mean(values: dict[str, Any]) -> dict[str, float]:
    """The mean over ranks of each float (or 0-dim tensor) in `values`; every rank must pass the same keys."""
    if not is_distributed():
        return {k: float(v) for k, v in values.items()}
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return {k: float(v) / get_world_size() for k, v in zip(keys, t.tolist())}


def all_reduce_max(x: float) -> float:
    """The largest `x` over ranks (e.g. elapsed seconds, so time budgets stop every rank at the same step)."""
    if not is_distributed():
        return x
    t = torch.tensor([x], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def shard_items(items: Sequence[T]) -> list[T]:
    """This rank's share of `items` (rank r gets items r, r + W, r + 2W, ...): e.g. GRPO prompts per rank."""
    return list(items[get_rank()::get_world_size()])


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ============================================================================ meshes
@dataclass
class Meshes:
    world: Any  # DeviceMesh over all ranks ("fsdp"): dense parameters are sharded over it
    dp: Any  # the "dp" dim of the ("dp", "ep") mesh: ranks holding the same experts
    ep: Any  # the "ep" dim: ranks exchanging tokens; experts are partitioned over it (None without EP)
    ep_size: int


def make_meshes(ep_size: int = 1, device_type: str | None = None) -> Meshes:
    from torch.distributed.device_mesh import init_device_mesh

    world = get_world_size()
    if ep_size < 1 or world % ep_size:
        raise ValueError(f"--ep-size {ep_size} must divide the number of ranks ({world})")
    device_type = device_type or ("cuda" if dist.get_backend() == "nccl" else "cpu")
    flat = init_device_mesh(device_type, (world,), mesh_dim_names=("fsdp",))
    if ep_size == 1:
        return Meshes(world=flat, dp=flat, ep=None, ep_size=1)
    grid = init_device_mesh(device_type, (world // ep_size, ep_size), mesh_dim_names=("dp", "ep"))
    return Meshes(world=flat, dp=grid["dp"], ep=grid["ep"], ep_size=ep_size)


# ============================================================================ expert parallel
def apply_expert_parallel(model: DeepseekV3ForCausalLM, ep_mesh) -> None:
    """Keep only this rank's experts in every MoE layer and route tokens to the others with all_to_all.

    The fused expert tensors become DTensors sharded on dim 0 over `ep_mesh` (this rank's local tensor is its
    E / ep experts), so FSDP, DCP and full-state-dict export all see the global [E, ...] shapes. Every rank must
    hold the same initial weights (same seed), as each keeps its slice of them.
    """
    from torch.distributed.tensor import DTensor, Shard

    ep, rank = ep_mesh.size(), ep_mesh.get_local_rank()
    for moe in model.moe_layers():
        experts = moe.experts
        E = experts.gate_up_proj.shape[0]
        if E % ep:
            raise ValueError(f"--ep-size {ep} must divide n_routed_experts ({E})")
        n = E // ep
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(experts, name)
            local = full.detach()[rank * n:(rank + 1) * n].clone()
            dt = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False)
            setattr(experts, name, nn.Parameter(dt, requires_grad=full.requires_grad))
        experts.ep_group = ep_mesh.get_group()


# ============================================================================ FSDP2
def mixed_precision(precision: str, device: torch.device):
    """bf16 parameters for compute with fp32 gradient reduction on GPUs; None (all fp32) otherwise."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type == "cuda" and precision in ("bf16", "fp8"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return None


def apply_fsdp(model: DeepseekV3ForCausalLM, meshes: Meshes, mp_policy=None) -> None:
    """fully_shard the routed experts (over "dp", when EP is on), each decoder layer and MTP module (over all
    ranks), then the root (embedding, final norm, head). Parameters become DTensors; FQNs are unchanged.
    Afterwards call the model as model(...) or model.loss(...): its other methods do not gather parameters."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mp = mp_policy or MixedPrecisionPolicy()
    world = get_world_size()
    if meshes.ep_size > 1:
        for moe in model.moe_layers():
            fully_shard(moe.experts, mesh=meshes.dp, mp_policy=mp)
            # the all_to_all backward already summed this expert's gradient over its EP group: average over all
            # ranks, not only over the dp replicas
            moe.experts.set_gradient_divide_factor(float(world))
            # a custom factor reduces with PREMUL_SUM, which gloo lacks: sum, then divide. Not on a 1-rank "dp"
            # mesh, where there is no reduction and torch 2.13 would then divide twice.
            if meshes.dp.size() > 1 and hasattr(moe.experts, "set_force_sum_reduction_for_comms"):
                moe.experts.set_force_sum_reduction_for_comms(True)
    for layer in model.model.layers:
        fully_shard(layer, mesh=meshes.world, mp_policy=mp)
    fully_shard(model, mesh=meshes.world, mp_policy=mp)
    # training calls model.loss(...), not model(...): gather the root's parameters around it too
    register_fsdp_forward_method(model, "loss")


def parallelize(model: DeepseekV3ForCausalLM, *, ep_size: int = 1, precision: str = "fp32") -> DeepseekV3ForCausalLM:
    """Expert parallel (ep_size > 1) + FSDP2 under torchrun; the model unchanged in a single process.

    Call after `init_distributed()`, with the model built (same seed on every rank) and moved to its device,
    and before making the optimizer. `precision` is the resolved TrainConfig precision ("bf16", "fp32", ...).
    This is what pretraining, SFT and GRPO all call.
    """
    if not is_distributed():
        if ep_size > 1:
            raise ValueError(f"--ep-size {ep_size} needs several ranks: launch with torchrun --nproc_per_node N")
        return model
    device = next(model.parameters()).device
    meshes = make_meshes(ep_size, device.type)
    if ep_size > 1:
        apply_expert_parallel(model, meshes.ep)
    apply_fsdp(model, meshes, mixed_precision(precision, device))
    return model


def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """Clip gradients to a global L2 norm of `max_norm`; return the norm before clipping.

    Sharded gradients (DTensors, possibly on different meshes: dense over all ranks, experts over dp x ep) are
    never replicated across ranks in our layout, so the squares of the local pieces, summed over all ranks,
    are the global squared norm. Plain tensors go to torch's own clip_grad_norm_.
    """
    from torch.distributed.tensor import DTensor

    params = [p for p in parameters if p.grad is not None]
    if not any(isinstance(p.grad, DTensor) for p in params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params]
    squares = torch.stack([g.float().pow(2).sum() for g in grads]).sum()
    dist.all_reduce(squares)
    norm = squares.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return norm


# ============================================================================ sharded checkpoints (DCP)
@contextlib.contextmanager
def shared_atomic_directory(path: Path) -> Iterator[Path]:
    """`atomic_directory` for all ranks: they write into one temporary directory, which rank 0 moves into
    place once every rank has finished."""
    if not is_distributed():
        with atomic_directory(path) as tmp:
            yield tmp
        return
    with atomic_directory(path) if is_main() else contextlib.nullcontext() as tmp:
        tmp = broadcast_object(tmp)
        yield tmp
        barrier()  # every rank's shards are on disk before rank 0 renames the directory
    barrier()


def save_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Model and optimizer state into a DCP directory: every rank writes its own shards (all ranks call this)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")  # single process: fine
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a `save_sharded` directory written at any world size / EP size into this run's model and optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (Path(path) / ".metadata").exists():
        raise ValueError(f"{path} is not a sharded (torch.distributed.checkpoint) checkpoint; it was written by an "
                         f"older nanoseek: start the run again in a new directory")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    for name, t in model_sd.items():
        meta = stored.get(f"model.{name}")
        if meta is None:
            raise ValueError(f"checkpoint {path} does not match this model (no tensor {name}); "
                             f"it belongs to a run with another config")
        if hasattr(meta, "size") and tuple(meta.size) != tuple(t.shape):
            raise ValueError(f"checkpoint tensor {name} has shape {list(meta.size)} but this run's model needs "
                             f"{list(t.shape)}; resume with the run's own config")
    state = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


# ============================================================================ full weights: export and inference copies
def full_state_dict(model: nn.Module, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """Unsharded CPU tensors ([E, ...] experts gathered from every EP rank). With `rank0_only` the other ranks
    get an empty dict (and use no memory for it). All ranks must call this."""
    if not is_distributed():
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)
    # gathering dp x ep-sharded experts takes two all-gathers, which DTensor reports as "suboptimal": fine here
    quiet = logging.getLogger("torch.distributed.tensor._redistribute")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return get_model_state_dict(model, options=options)
    finally:
        quiet.setLevel(level)


def unsharded_copy(model: DeepseekV3ForCausalLM, state: dict[str, torch.Tensor] | None = None,
                   device: str | torch.device = "cpu") -> DeepseekV3ForCausalLM:
    """A plain (no FSDP, no EP) model with the full weights, e.g. for GRPO rollouts that each rank generates
    on its own without collectives. All ranks must call this; each gets its own copy."""
    if state is None:
        state = full_state_dict(model, rank0_only=False)
    with torch.device("meta"):
        plain = DeepseekV3ForCausalLM(model.config)
    plain.load_state_dict({k: v.to(device) for k, v in state.items()}, assign=True)
    # non-persistent buffers are not in a state dict: rebuild them off the meta device
    plain.model.rotary_emb = type(plain.model.rotary_emb)(model.config).to(device)
    for m in plain.moe_layers():
        m.load_counts = torch.zeros(model.config.n_routed_experts, device=device)
    return plain


def export_model(model: DeepseekV3ForCausalLM, path: str | Path, tokenizer=None) -> Path:
    """Write the final model in Hugging Face layout from any world size: rank 0 gathers and writes, every rank
    must call this, and all return once the directory is in place."""
    path = Path(path)
    if not is_distributed():
        return save_model(model, path, tokenizer=tokenizer)
    state = full_state_dict(model, rank0_only=True)
    if is_main():
        save_model(unsharded_copy(model, state), path, tokenizer=tokenizer)
    barrier()
    return path
