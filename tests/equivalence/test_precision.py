"""runtime.precision: fp32 (the default) and bf16 (mixed precision: local training's matrix
products in bfloat16 under torch.autocast, float32 master weights, float32 losses and
per-client reductions), through the product's round loop (rounds.run_rounds on two in-process
pools), on the CPU.

- fp32 is the computation without the option, bit for bit;
- bf16 FedMR (fcf, fedncf, fedrap backbones) ends within BF16_ATOL of the float64 run that the
  oracle tests pin (test_fedmr_equivalence: the engine in float64 is reference/oracle.py's
  one-client-at-a-time FedMR to 1e-8), in every global parameter, every user's personal
  parameters and every user's scores over all items; and it really ran in bfloat16: it is
  further from that run than float32 is (BF16_MIN_GAP) while the parameters stay float32;
- bf16 with float64 pools and unknown precisions are refused.

Measured (2 rounds, 16 users, 40 items, dim 8, two local epochs; CPU with AVX-512 BF16, torch
2.13): float32 ends within 1.5e-6 of float64. bf16, for fcf / fedncf / fedrap: everything
(parameters and scores, logits up to about 2.7) within 1.8e-2 / 1.4e-3 / 3.5e-2, a few
bfloat16 ulps (2^-8 relative); the global parameters within 2.9e-3 / 1.5e-4 / 2.4e-3, which is
2.6% / 0.3% / 4.1% of how far training moved them from their initial values (0.11 / 0.050 /
0.058). Tolerances: BF16_ATOL = 0.06 on everything and BF16_GLOBAL_REL = 0.15 of that movement
on the globals; a bf16 path that lost or mangled updates would be off by about the movement
itself. GFMFR's groups are left out: a k-means assignment may flip under any rounding."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.federated.rounds import in_process
from test_equivalence import synthetic
from test_fedmr_equivalence import with_features
from test_fusion_devices import make_config, max_difference, run

BF16_ATOL = 0.06  # bf16 run against the float64 run, parameters and scores (measured: <= 3.5e-2)
BF16_GLOBAL_REL = 0.15  # the globals' gap / how far training moved them (measured: <= 0.041)
BF16_MIN_GAP = 1e-4  # bf16 is at least this far from float64 somewhere (float32: ~1e-6)
FLOAT32_ATOL = 1e-4  # as in test_fusion_devices


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """Every test of this module runs on one torch thread (conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def data():
    return with_features(synthetic(n_users=16, n_items=40, high=30))


def with_precision(backbone: str, precision: str):
    cfg = make_config(backbone, "fedmr", None)
    return cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"precision": precision})})


def test_fp32_is_the_default_bit_for_bit(data):
    cfg = make_config("fcf", "fedmr", None)
    assert cfg.runtime.precision == "fp32"
    explicit = load_config(None, ["runtime.precision=fp32"]).runtime.precision
    assert explicit == "fp32"
    default, _, _ = run(cfg, data, torch.float32)
    fp32, _, _ = run(with_precision("fcf", "fp32"), data, torch.float32)
    assert set(default) == set(fp32)
    assert all(torch.equal(default[name], fp32[name]) for name in default)


@pytest.mark.parametrize("backbone", ["fcf", "fedncf", "fedrap"])
def test_bf16_fedmr_matches_the_float64_run(data, backbone):
    reference, _, _ = run(make_config(backbone, "fedmr", None), data, torch.float64)
    got, history, shards = run(with_precision(backbone, "bf16"), data, torch.float32)
    assert all(shard.precision == "bf16" for shard in shards)
    # master weights: the pools' state stays float32
    assert all(t.dtype == torch.float32 for shard in shards for t in shard.store.dense.values())
    assert len(history) == 2 and all(math.isfinite(m["train/loss"]) for m in history)
    diffs = max_difference(got, reference)
    assert max(diffs.values()) < BF16_ATOL, {k: v for k, v in diffs.items() if v >= BF16_ATOL}
    assert max(diffs.values()) > BF16_MIN_GAP  # the products did run in bfloat16
    initial = in_process(make_config(backbone, "fedmr", None), data, n_pools=2,
                         dtype=torch.float64)[0].initial.global_params
    moved = max((reference[f"global {name}"] - value.double()).abs().max().item() for name, value in initial.items())
    global_gap = max(gap for name, gap in diffs.items() if name.startswith("global "))
    assert global_gap < BF16_GLOBAL_REL * moved, (global_gap, moved)
    float32, _, _ = run(make_config(backbone, "fedmr", None), data, torch.float32)
    assert max(max_difference(float32, reference).values()) < FLOAT32_ATOL


def test_bf16_with_float64_pools_is_refused(data):
    with pytest.raises(ValueError, match="runtime.precision=bf16 keeps float32 master weights"):
        in_process(with_precision("fcf", "bf16"), data, dtype=torch.float64)


@pytest.mark.parametrize("value", ["fp16", "bfloat16", "BF16", "float32", ""])
def test_unknown_precisions_are_refused(value):
    with pytest.raises(ConfigError, match="runtime.precision: Input should be 'fp32' or 'bf16'"):
        load_config(None, [f"runtime.precision={value}"])
    assert load_config(None, ["runtime.precision=bf16"]).runtime.precision == "bf16"
