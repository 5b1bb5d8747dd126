import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
    torch.set_num_threads(1)  # undo tests that change the thread count (see below)


# pytest runs with -n 2 on 2 cores: one thread per worker avoids oversubscription, which makes
# small CPU ops orders of magnitude slower on a loaded machine.
torch.set_num_threads(1)


@pytest.fixture
def private_data_cache(monkeypatch, tmp_path):
    """A data cache per test (prepared corpora never leak between tests or workers)."""
    monkeypatch.setenv("RESSTREAM_DATA_CACHE", str(tmp_path / "data_cache"))
