import os
from pathlib import Path

import pytest
import torch

from napari_cnnt.model import CNNTConfig

FIXTURES = Path(os.environ.get("CNNT_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not (FIXTURES / "seedfmt_default.pt").is_file():
        pytest.skip(f"reference fixtures not found in {FIXTURES} (set CNNT_FIXTURES)")
    return FIXTURES


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
