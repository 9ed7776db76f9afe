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
