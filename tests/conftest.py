"""Fixtures shared by several test modules."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: tiny tensors on a shared 2-core machine spin far more than they compute with
    two, and the bitwise resume checks (tests/test_reliability.py) need the same kernels' split."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
