"""Two CPU ranks over gloo: data parallel (FSDP2) and expert parallel match one process; DCP checkpoints reshard.

(a) FSDP2 training over 2 ranks logs the losses of one process with the same global batch;
(b) an expert-parallel MoE layer over 2 ranks gives the single-process layer's outputs and gradients;
(c) a checkpoint written by 2 ranks resumes in 1 process with the same next-step loss.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanoseek.cli import main

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--preset", "smoke", "--data", "builtin:300", "--seq-len", "32", "--precision", "fp32", "--grad-accum", "2",
        "--set", "eval_every=2", "--set", "eval_batches=2", "--set", "warmup_steps=2", "--set", "keep_checkpoints=5"]
STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, args: list[str], timeout: float = 240) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "nanoseek", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _metrics(run: Path) -> dict[int, dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r for r in lines}


# ---------------------------------------------------------------------------------------------- (a) and (c)
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 4 steps as one process and as 2 ranks, checkpoints at 2 and 4. Global batch: 2 micro-batches
    of 4 sequences, i.e. of 2 sequences per rank."""
    root = tmp_path_factory.mktemp("dist")
    common = [*ARGS, "--steps", str(STEPS), "--set", "checkpoint_every=2"]
    assert main(["pretrain", *common, "--run", str(root / "one"), "--batch-size", "4"]) == 0
    # --run-dir: torchrun's parser would take `--run` for an abbreviation of its own --run-path
    _torchrun(2, ["pretrain", *common, "--run-dir", str(root / "two"), "--batch-size", "2"])
    return root


def test_data_parallel_matches_one_process(runs):
    one, two = _metrics(runs / "one"), _metrics(runs / "two")
    assert sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        for key in ("loss", "main_loss", "grad_norm", "val_loss"):
            if key in one[step]:
                assert abs(one[step][key] - two[step][key]) <= 1e-5, (step, key, one[step][key], two[step][key])
        assert one[step]["tokens"] == two[step]["tokens"]
        assert one[step]["bias_norm"] == pytest.approx(two[step]["bias_norm"], abs=1e-6)
    # the exported model (gathered from the shards) is the one-process model
    from nanoseek.checkpoint import load_model

    a, b = load_model(runs / "one"), load_model(runs / "two")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-5), name


def test_checkpoint_from_two_ranks_resumes_in_one_process(runs, tmp_path):
    run = tmp_path / "resumed"
    shutil.copytree(runs / "two", run)
    for extra in ("model", "receipt.json", "checkpoints/step_4"):
        shutil.rmtree(run / extra, ignore_errors=True) if (run / extra).is_dir() else (run / extra).unlink()
    assert main(["pretrain", *ARGS, "--steps", str(STEPS), "--set", "checkpoint_every=2", "--run", str(run),
                 "--batch-size", "4", "--resume"]) == 0
    resumed, two = _metrics(run), _metrics(runs / "two")
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in (3, 4):
        assert abs(resumed[step]["loss"] - two[step]["loss"]) <= 1e-5, step


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 4])
def test_fsdp_with_expert_parallel_matches_one_process(runs, tmp_path, nproc):
    """Experts split over 2 ranks (dp 1 x ep 2, and dp 2 x ep 2 on 4 ranks): the one-process losses and gradient
    norms, and the exported model gathers every expert."""
    _torchrun(nproc, ["pretrain", *ARGS, "--steps", str(STEPS), "--set", "checkpoint_every=2", "--run-dir",
                      str(tmp_path / "ep"), "--batch-size", str(4 // nproc), "--ep-size", "2"])
    one, ep = _metrics(runs / "one"), _metrics(tmp_path / "ep")
    for step in one:
        assert abs(one[step]["loss"] - ep[step]["loss"]) <= 1e-5, step
        assert abs(one[step]["grad_norm"] - ep[step]["grad_norm"]) <= 1e-5, step
    from nanoseek.checkpoint import load_model

    a, b = load_model(runs / "one"), load_model(tmp_path / "ep")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-5), name


# ---------------------------------------------------------------------------------------------- (b)
def _seeded_moe():
    """The same MoE layer (weights and router bias) in every process that builds it."""
    from nanoseek.config import smoke
    from nanoseek.model.moe import MoE

    cfg = smoke()
    torch.manual_seed(0)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return cfg, moe


def _moe_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from nanoseek.train import distributed as D

    D.init_distributed("cpu")
    cfg, moe = _seeded_moe()
    x = torch.randn(world, 3, 16, cfg.hidden_size)  # each rank's tokens; rank r uses x[r]
    g = torch.randn(world, 3, 16, cfg.hidden_size)

    class Holder(torch.nn.Module):  # apply_expert_parallel walks a model's MoE layers
        def __init__(self):
            super().__init__()
            self.moe = moe

        def moe_layers(self):
            return [self.moe]

    D.apply_expert_parallel(Holder(), D.make_meshes(ep_size=world).ep)
    xr = x[rank].clone().requires_grad_(True)
    y = moe(xr)
    (y * g[rank]).sum().backward()
    grads = {n: p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for n, p in moe.named_parameters()}
    grads["gate.weight"] = grads["gate.weight"].clone()
    dist.all_reduce(grads["gate.weight"])  # the router is replicated: its gradient is the sum over ranks
    if hasattr(moe, "shared_experts"):
        for n in [n for n in grads if n.startswith("shared_experts")]:
            grads[n] = grads[n].clone()
            dist.all_reduce(grads[n])
    stats = moe.update_bias()
    torch.save({"y": y.detach(), "x_grad": xr.grad, "grads": grads, "bias": moe.gate.e_score_correction_bias,
                "stats": stats}, f"{out}/rank{rank}.pt")
    D.cleanup()


def test_expert_parallel_moe_matches_one_process(tmp_path):
    world = 2
    # fork: the children start with torch already imported (spawn would import it again, slowly)
    mp.start_processes(_moe_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True,
                       start_method="fork")

    cfg, moe = _seeded_moe()
    x = torch.randn(world, 3, 16, cfg.hidden_size)
    g = torch.randn(world, 3, 16, cfg.hidden_size)
    xf = x.reshape(world * 3, 16, -1).clone().requires_grad_(True)
    y = moe(xf)
    (y * g.reshape(world * 3, 16, -1)).sum().backward()
    stats = moe.update_bias()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    n = cfg.n_routed_experts // world
    for r, got in enumerate(ranks):
        torch.testing.assert_close(got["y"], y.detach()[3 * r:3 * (r + 1)], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["x_grad"], xf.grad[3 * r:3 * (r + 1)], atol=1e-5, rtol=1e-5)
        for name, p in moe.named_parameters():
            want = p.grad[n * r:n * (r + 1)] if name.startswith("experts.") else p.grad
            assert got["grads"][name].shape == want.shape, name
            torch.testing.assert_close(got["grads"][name], want, atol=1e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(got["bias"], moe.gate.e_score_correction_bias)  # loads all-reduced
        assert got["stats"]["load_max_over_mean"] == pytest.approx(stats["load_max_over_mean"])
    assert any(float(v.abs().sum()) > 0 for v in ranks[1]["grads"].values())
