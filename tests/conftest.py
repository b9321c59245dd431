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


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance of 2 CPUs for the tests of one module."""
    import os

    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # as pipeline.centralized.job sets it
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never another cluster
    yield
    ray.shutdown()
