import os
import tempfile

import pytest
import torch

# Deterministic, quiet and single-process-friendly by default.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The remembered CPU peak (nanoseek.cost) goes to a throwaway directory, not the user's cache.
os.environ.setdefault("NANOSEEK_CACHE_DIR", tempfile.mkdtemp(prefix="nanoseek-cache-"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def smoke_model(tmp_path_factory):
    """A run directory holding a smoke model pretrained for 3 steps, with its tokenizer; made once per session."""
    from nanoseek.cli import main

    run = tmp_path_factory.getbasetemp() / "smoke_pretrained"
    assert main(["pretrain", "--preset", "smoke", "--data", "builtin:300", "--batch-size", "4", "--seq-len", "64",
                 "--steps", "3", "--run", str(run)]) == 0
    return run


def routing_biases(model_dir) -> dict:
    """Every MoE layer's e_score_correction_bias in a saved model (fine-tuning stages must leave them alone)."""
    from nanoseek.checkpoint import load_model

    return {k: v for k, v in load_model(model_dir).state_dict().items() if k.endswith("e_score_correction_bias")}
