import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


# pytest runs with -n 2 on 2 cores: one thread per worker avoids oversubscription, which makes
# small CPU ops orders of magnitude slower on a loaded machine.
torch.set_num_threads(1)
