"""FedMR, GFMFR and FedMR + GFMFR trained through the product's round loop (rounds.run_rounds on
in-process pools) with runtime.device set to every torch device this machine has, against the
float64 CPU run that the oracle tests pin (test_fedmr_equivalence, test_gfmfr_equivalence):

- float64 on the device: on the CPU the default run itself (runtime.device unset resolves to
  the CPU); elsewhere the same up to the summation order of the device's kernels;
- float32 on the device (the production dtype): within float32 rounding of it.

Compared: the global parameters, every user's personal vectors and personal table rows, GFMFR's
groups, and every user's scores over all items (the evaluation path). Each run also checks that
the pools' state and frozen features live on the device asked for."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.federated.engine.sampling import dropout_scale, dropout_scale_on
from pipeline.federated.rounds import in_process, run_rounds
from test_equivalence import synthetic
from test_fedmr_equivalence import with_features

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ROUNDS = 2  # GFMFR forms groups in round 0 and distils in round 1
FLOAT64_ATOL = 1e-7  # a device's float64 kernels against the CPU's (GFMFR's ratio weight grows differences)
FLOAT32_ATOL = 1e-4  # float32 on the device against float64 on the CPU (about 1e-6 on the CPU)

FEDMR = "model.fusion={d_f: 8, d_r: 6, dropout: 0.2}"
GFMFR = "model.gfmfr={group_num: 3, server_epochs: 4, group_emb_dim: 16, server_batch: 64}"
METHODS = {"fedmr": (FEDMR,), "gfmfr": (GFMFR,), "fedmr+gfmfr": (FEDMR, GFMFR)}
BACKBONES = {
    "fcf": ("train.lr=0.01", "train.tol=0.05"),
    "fedncf": ("train.lr=0.03", "train.tol=0.01"),
    "fedrap": ("train.lr=0.005", "model.fedrap_lambda=2.0", "model.fedrap_mu=1.0", "train.tol=0.1"),
}
CASES = [(backbone, method) for backbone in ("fcf", "fedncf") for method in METHODS] + [("fedrap", "fedmr+gfmfr")]


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """Every test of this module runs on one torch thread (conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def data():
    return with_features(synthetic(n_users=16, n_items=40, high=30))


def make_config(backbone: str, method: str, device: str | None):
    return load_config(None, [f"model.backbone={backbone}", "model.dim=8", "train.local_epochs=2",
                              "train.batch_rows=24", "train.neg_ratio=2", "train.seed=3", "train.model_seed=5",
                              "train.rounds=4", *BACKBONES[backbone], *METHODS[method],
                              *([f"runtime.device={device}"] if device else [])])


def run(cfg, data, dtype):
    """ROUNDS rounds on two in-process pools; (what the run ended with, per name, on the CPU in
    float64; the metrics of its rounds; the pools)."""
    strategy, pools = in_process(cfg, data, n_pools=2, dtype=dtype)
    history = run_rounds(strategy, pools, rounds=ROUNDS)
    assert len(history) == ROUNDS
    initial = strategy.initial.global_params
    assert max((strategy.globals[name].double().cpu() - initial[name].double()).abs().max().item()
               for name in initial) > 1e-3  # the comparisons below are not vacuous
    out = {f"global {name}": value.double().cpu() for name, value in strategy.globals.items()}
    for shard in pools.pools:
        store, device = shard.store, shard.device
        items = torch.arange(data.n_items, device=device)
        for pos, user in enumerate(store.users.tolist()):
            for name, tensor in store.dense.items():
                out[f"user {user} {name}"] = tensor[pos].double().cpu()
            local = torch.full((data.n_items,), pos, dtype=torch.int64, device=device)
            for name in store.tables:
                out[f"user {user} {name}"] = store.table_rows(name, local, items).double().cpu()
        users = torch.as_tensor(shard.users)
        out[f"scores of {shard.users.tolist()}"] = shard.scores(strategy.globals, users).double()
    if cfg.model.gfmfr is not None:
        out["groups"] = torch.as_tensor(np.asarray(strategy.groups.group_of)).double()
    return out, history, pools.pools


def max_difference(a: dict, b: dict) -> dict[str, float]:
    assert set(a) == set(b)
    out = {}
    for name in a:
        assert a[name].shape == b[name].shape, name
        assert torch.equal(torch.isnan(a[name]), torch.isnan(b[name])), name  # unset rho stays unset
        gap = (torch.nan_to_num(a[name]) - torch.nan_to_num(b[name])).abs()
        out[name] = gap.max().item() if gap.numel() else 0.0
    return out


@pytest.fixture(scope="module")
def reference(data):
    """The default float64 CPU run of a backbone and method (runtime.device unset)."""
    cache = {}

    def get(backbone, method):
        if (backbone, method) not in cache:
            cache[backbone, method] = run(make_config(backbone, method, None), data, torch.float64)
        return cache[backbone, method]

    return get


def check_on_device(cfg, shards, history, method):
    device = cfg.runtime.device
    for shard in shards:
        assert shard.device.type == device
        assert all(t.device.type == device for t in (*shard.store.dense.values(), *shard.features.values()))
    assert set(shards[0].features) == ({"text", "image"} if "fedmr" in method else set())
    if method != "fedmr":  # the distillation term acted
        assert min(m["group/distilled_clients"] for m in history[1:]) > 0


@pytest.mark.parametrize("backbone, method", CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_fusion_trains_on_device(data, reference, device, backbone, method):
    expected, expected_history, expected_shards = reference(backbone, method)
    cfg = make_config(backbone, method, device)
    if device == "cpu":  # runtime.device=cpu is the default run
        assert make_config(backbone, method, None).runtime.device == "auto"
        check_on_device(cfg, expected_shards, expected_history, method)
    else:
        got, history, shards = run(cfg, data, torch.float64)
        check_on_device(cfg, shards, history, method)
        diffs = max_difference(got, expected)
        assert max(diffs.values()) < FLOAT64_ATOL, {k: v for k, v in diffs.items() if v >= FLOAT64_ATOL}

    got32, history32, shards32 = run(cfg, data, torch.float32)
    check_on_device(cfg, shards32, history32, method)
    diffs = max_difference(got32, expected)
    assert max(diffs.values()) < FLOAT32_ATOL, {k: v for k, v in diffs.items() if v >= FLOAT32_ATOL}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.0, 0.2, 0.5, 0.9])
def test_dropout_masks_on_a_device_are_the_hosts(device, dtype, p):
    """The fusion module's dropout multipliers hashed on a device are the ones numpy makes on the
    host, bit for bit (the oracle shares the numpy ones)."""
    rng = np.random.default_rng(7)
    users, items = rng.integers(0, 1 << 40, 300), rng.integers(0, 1 << 20, 300)
    host = dropout_scale(11, 3, 1, 4, 2, users, items, 37, p, dtype={torch.float32: np.float32,
                                                                     torch.float64: np.float64}[dtype])
    on_device = dropout_scale_on(device, 11, 3, 1, 4, 2, users, items, 37, p, dtype)
    assert on_device.device.type == device and on_device.dtype == dtype
    assert np.array_equal(on_device.cpu().numpy(), host)
    if p > 0:
        assert 0 < (host == 0).mean() < 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_cuda_without_a_gpu_is_a_clear_error(data):
    with pytest.raises(RuntimeError, match="runtime.device=cuda .* no CUDA device"):
        in_process(make_config("fcf", "fedmr+gfmfr", "cuda"), data)
