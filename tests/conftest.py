import os
import sys
from pathlib import Path

# Fewer threads on a loaded machine: transformers' from_pretrained loads weights in a thread pool
# (core_model_loading.py, up to 4 workers) unless HF_DEACTIVATE_ASYNC_LOAD is set; under the
# parallel suite on a busy machine starting those threads failed once ("can't start new
# thread"). Set before transformers is imported; child processes inherit it.
os.environ.setdefault("HF_DEACTIVATE_ASYNC_LOAD", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# smoke mode (resstream.smoke) only where a test sets it (tests/test_doc_commands.py): an
# exported RESSTREAM_SMOKE would change the budgets every other test relies on
os.environ.pop("RESSTREAM_SMOKE", None)

import pytest  # noqa: E402
import torch  # noqa: E402
import tqdm  # noqa: E402

tqdm.tqdm.monitor_interval = 0  # no tqdm monitor thread per progress bar

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="device of the device-generic tests (those that take the `device` "
                          "fixture): cpu (default) or cuda[:N]; with another device than cpu only "
                          "those tests run (scripts/gpu-check)")


@pytest.fixture
def device(request) -> torch.device:
    """The device that device-generic tests build their models and tensors on (--device)."""
    return torch.device(request.config.getoption("--device"))


def pytest_collection_modifyitems(config, items):
    """With --device=cuda, run only the device-generic tests: the others would repeat the CPU
    run. A device that is not there is a usage error, not a suite of skips."""
    name = config.getoption("--device")
    if name == "cpu":
        return
    if not name.startswith("cuda") or not torch.cuda.is_available():
        raise pytest.UsageError(f"--device={name} is not available here; allowed: cpu"
                                + (", cuda, cuda:N" if torch.cuda.is_available() else ""))
    keep = [item for item in items if "device" in getattr(item, "fixturenames", ())]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep


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
