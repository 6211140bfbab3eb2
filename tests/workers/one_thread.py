"""A fixture for test modules of float64 model runs: importing ``one_torch_thread`` into a module
runs its tests with one torch thread (autouse, module scope)."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # float64 matmuls on a busy 2-core box run ~40x slower with 2 threads than with 1
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
