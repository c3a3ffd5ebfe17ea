import pytest
import torch


@pytest.fixture
def one_thread():
    """Run the test with one intra-op thread (two on a busy 2-core machine are several times
    slower than one) and restore the caller's setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
