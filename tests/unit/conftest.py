import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def one_thread():
    """Unit tests run tiny ops: on a small shared machine intra-op threads only add contention
    (measured 10x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
