import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run many tiny parallel regions, which crawl when other jobs share the cores.

    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
