"""Shared test fixtures."""

import os
import shutil
import tempfile

import pytest
import torch


def pytest_configure(config):
    """The suite prepares its datasets in a folder of its own, never in the user's data cache
    (pipeline/data/cache.py); subprocesses and Ray workers inherit it."""
    if not os.environ.get("PIPELINE_DATA_CACHE"):
        config._pipeline_cache = tempfile.mkdtemp(prefix="pipeline-test-cache-")
        os.environ["PIPELINE_DATA_CACHE"] = config._pipeline_cache
    # and writes default outputs (a config without runtime.out, ...) in a folder of its own too,
    # never in the user's runs root (pipeline/paths.py)
    config._pipeline_runs = tempfile.mkdtemp(prefix="pipeline-test-runs-")
    os.environ["PIPELINE_RUNS"] = config._pipeline_runs


def pytest_unconfigure(config):
    for folder in (getattr(config, "_pipeline_cache", None), getattr(config, "_pipeline_runs", None)):
        if folder:  # the folders the suite made for itself
            shutil.rmtree(folder, ignore_errors=True)


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
