import importlib.util
import os
from pathlib import Path

# The GUI tests run on Qt6, the binding the napari extra installs, also where PyQt5 is installed too
# (qtpy would pick PyQt5 first). Set QT_API to choose another binding.
if importlib.util.find_spec("PyQt6") is not None:
    os.environ.setdefault("QT_API", "pyqt6")

import pytest
import torch

from napari_cnnt import runtime
from napari_cnnt.model import CNNTConfig

NO_BF16 = "this CPU cannot run bfloat16 convolutions (no AVX512-BF16/AMX, or NAPARI_CNNT_DISABLE_BF16 is set)"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``bf16`` need the fast path; they skip, saying why, where it cannot run."""
    if runtime.cpu_runs_bf16():
        return
    for item in items:
        if item.get_closest_marker("bf16"):
            item.add_marker(pytest.mark.skip(reason=NO_BF16))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The folder of the full-size reference checkpoint (``seedfmt_default.pt``, 53 MB, not in the
    repository), named by the environment variable ``CNNT_FIXTURES``; tests using it skip without it.

    The small fixtures in the repository are in ``reference_fixtures``; they need no set-up.
    """
    folder = os.environ.get("CNNT_FIXTURES")
    if not folder:
        pytest.skip("full-size reference fixture not given: set CNNT_FIXTURES to the folder holding seedfmt_default.pt")
    if not (Path(folder) / "seedfmt_default.pt").is_file():
        pytest.skip(f"CNNT_FIXTURES={folder} holds no seedfmt_default.pt")
    return Path(folder)


@pytest.fixture
def tiny_config() -> CNNTConfig:
    """A CNNT small enough for fast tests but with every structural part."""
    return CNNTConfig(
        blocks=(8, 16), blocks_per_set=1, n_head=2, pre_channels=(4, 8),
        dropout_p=0.0, time=4, height=16, width=16,
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run many tiny parallel regions, which crawl when other jobs share the cores.

    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_bf16(monkeypatch):
    """This process behaves as on a CPU whose oneDNN cannot run bfloat16 (AVX2 only), whatever
    the environment says (``NAPARI_CNNT_DISABLE_BF16`` would name itself as the reason instead)."""
    monkeypatch.delenv(runtime.DISABLE_BF16, raising=False)
    monkeypatch.setattr(runtime, "cpu_runs_bf16", lambda: False)
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
