import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP contention slows them 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
