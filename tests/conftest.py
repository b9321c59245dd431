"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: intra-op threads only add synchronisation (milliseconds per op on a
    loaded 2-core box). Numerics do not depend on it. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")` or an autouse wrapper."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
