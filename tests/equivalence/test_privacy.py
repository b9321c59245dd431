"""Client-level differential privacy (pipeline/federated/privacy.py): the accountant, clipping,
the server's noise, the engine against the one-client-at-a-time oracle with DP on, and a real
run whose epsilon reaches TensorBoard and the summary."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.federated.strategy.aggregate import initial_state, round_lrs
from pipeline.federated.privacy import clip_factors, epsilon_after, gaussian_noise
from pipeline.federated.engine.shard import Shard
from reference.oracle import oracle_scores, oracle_scores_fedmr
from test_equivalence import (VARIANTS, engine_dense, engine_scores, make_config, max_diffs, moved, run_engine, run_oracle,
                              synthetic)

ATOL = 1e-5
DP = ("privacy.clip=0.3", "privacy.noise_multiplier=0.5")
# about the median norm of a client's first-round update in each variant: some clipped, some not
MEDIAN_NORM = {"fedavg": 0.5, "fcf": 6.0, "fedncf": 0.4, "pfedrec-two_step": 3.5, "fedrap-l1": 5.4}


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """One torch thread (conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def data():
    return synthetic()


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    by_rounds = [epsilon_after(t, 1.0, 0.1, 1e-5) for t in (1, 5, 20, 100)]
    assert all(a < b for a, b in zip(by_rounds, by_rounds[1:])), by_rounds
    by_noise = [epsilon_after(30, sigma, 0.1, 1e-5) for sigma in (0.5, 1.0, 2.0, 4.0)]
    assert all(a > b for a, b in zip(by_noise, by_noise[1:])), by_noise
    assert epsilon_after(30, 1.0, 0.05, 1e-5) < epsilon_after(30, 1.0, 0.5, 1e-5)  # sampling amplifies
    assert epsilon_after(30, 1.0, 0.1, 1e-3) < epsilon_after(30, 1.0, 0.1, 1e-6)
    assert epsilon_after(10, 0.0, 0.1, 1e-5) == float("inf") and epsilon_after(0, 1.0, 0.1, 1e-5) == 0.0


def test_clip_factors_bound_every_norm():
    norms = torch.tensor([0.0, 0.1, 0.3, 0.31, 5.0], dtype=torch.float64)
    factors = clip_factors(norms.square(), 0.3)
    assert factors[:3].tolist() == [1.0, 1.0, 1.0]
    assert (norms * factors).tolist() == pytest.approx([0.0, 0.1, 0.3, 0.3, 0.3])


def test_noise_is_a_function_of_seed_and_round():
    shapes = {"item": (50, 4), "tower.0.weight": (8, 8)}
    a, b = gaussian_noise(shapes, 0.7, 3, 2), gaussian_noise(shapes, 0.7, 3, 2)
    assert all(torch.equal(a[k], b[k]) for k in shapes)
    c = gaussian_noise(shapes, 0.7, 3, 3)
    assert not torch.equal(a["item"], c["item"])
    big = gaussian_noise({"x": (200_000,)}, 0.7, 0, 0)["x"].double()
    assert abs(float(big.std()) - 0.7) < 0.01 and abs(float(big.mean())) < 0.01


@pytest.mark.parametrize("variant", list(MEDIAN_NORM))
def test_engine_matches_oracle_with_privacy_and_dropout(data, variant):
    """Clipping per client, uniform mean, the server's noise on every coordinate, dropouts: the
    vectorised engine equals the oracle (float64)."""
    backbone, *extra = VARIANTS[variant]
    cfg = make_config(backbone, "train.participation=0.7", "train.dropout=0.2", *extra,
                      f"privacy.clip={MEDIAN_NORM[variant]}", "privacy.noise_multiplier=0.5")
    shards, g = run_engine(cfg, data, 2, n_shards=2)
    oracle = run_oracle(cfg, data, 2)
    diffs = max_diffs(engine_dense(shards, g, data.n_items), oracle)
    assert max(diffs.values()) < ATOL, diffs
    s_engine = engine_scores(shards, g, data.n_users, data.n_items)
    s_oracle = oracle_scores(cfg, oracle, list(range(data.n_users)), data.n_items)
    assert (s_engine - s_oracle).abs().max().item() < ATOL
    # the privacy has teeth: the same run without it ends elsewhere
    plain = run_oracle(make_config(backbone, "train.participation=0.7", "train.dropout=0.2", *extra), data, 2)
    assert moved(plain, oracle) > 1e-2


def test_some_clients_are_clipped_and_no_update_exceeds_the_bound(data):
    backbone, *extra = VARIANTS["fcf"]
    cfg = make_config(backbone, *extra, f"privacy.clip={MEDIAN_NORM['fcf']}", "privacy.noise_multiplier=0")
    init = initial_state(cfg, data.n_users, data.n_items)
    shard = Shard(cfg, data, None, np.arange(data.n_users), init, dtype=torch.float64)
    g = {k: v.double() for k, v in init.global_params.items()}
    upload = shard.train(0, g, np.arange(data.n_users), round_lrs(cfg, data.n_items, 0))
    assert 0 < upload.clipped < upload.clients, upload.clipped  # the bound is active for some, not all
    assert upload.weight == upload.clients  # uniform mean under DP
    for u in range(data.n_users):  # each client alone: its whole update has norm <= clip
        alone = Shard(cfg, data, None, np.arange(data.n_users), init, dtype=torch.float64)
        up = alone.train(0, g, np.array([u]), round_lrs(cfg, data.n_items, 0))
        norm = float(sum(t.square().sum() for t in up.table_sums.values()).sqrt())
        assert norm <= MEDIAN_NORM["fcf"] + 1e-9


def test_no_noise_and_a_loose_bound_is_plain_federated_averaging(data):
    backbone, *extra = VARIANTS["fcf"]
    plain = run_engine(make_config(backbone, *extra), data, 2, n_shards=2)[1]
    loose = run_engine(make_config(backbone, *extra, "privacy.clip=1e9", "privacy.noise_multiplier=0"), data, 2,
                       n_shards=2)[1]
    assert max((plain[k] - loose[k]).abs().max().item() for k in plain) < 1e-12


@pytest.mark.parametrize("agg", ["fedavg", "grad_adam"])
def test_fedmr_engine_matches_oracle_with_privacy(data, agg):
    """FedMR's fusion weights (weight averaging) or last-batch gradients (grad_adam) are clipped
    with the rest of the client's update; the engine equals the oracle."""
    from test_fedmr_equivalence import MOE, make_config as fedmr_config, run_engine as fedmr_engine, with_features

    data = with_features(data)
    cfg = fedmr_config("fcf", f"{MOE}, fusion_agg: {agg}", "train.participation=0.6", *DP)
    shards, g = fedmr_engine(cfg, data, 2, n_shards=2)
    oracle = run_oracle(cfg, data, 2)
    diffs = max_diffs(engine_dense(shards, g, data.n_items), oracle)
    assert max(diffs.values()) < ATOL, diffs
    s_engine = engine_scores(shards, g, data.n_users, data.n_items)
    s_oracle = oracle_scores_fedmr(cfg, data, oracle, list(range(data.n_users)))
    assert (s_engine - s_oracle).abs().max().item() < ATOL


def test_privacy_with_gfmfr_is_refused():
    with pytest.raises(ValueError, match="grouping vector"):
        load_config(None, ["model.gfmfr={group_num: 2}", "privacy.clip=1", "privacy.noise_multiplier=1"])


@pytest.mark.slow
def test_a_private_run_reports_epsilon_in_tensorboard_and_summary(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from test_cli import run_cli

    out = tmp_path / "run"
    done = run_cli("train", "--out", str(out), "--json", "--set",
                   "data.synthetic={n_users: 50, n_items: 40, images: false}", "model.backbone=fcf",
                   "train.rounds=3", "train.local_epochs=2", "train.participation=0.5", "runtime.pools=2",
                   "privacy={clip: 0.5, noise_multiplier: 1.1, delta: 1e-4}")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["privacy"]["epsilon"] == pytest.approx(epsilon_after(3, 1.1, 0.5, 1e-4))
    assert summary["privacy"]["delta"] == 1e-4 and summary["privacy"]["accountant"] == "opacus RDPAccountant"
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    eps = [e.value for e in events.Scalars("privacy/epsilon")]
    assert eps == pytest.approx([epsilon_after(t, 1.1, 0.5, 1e-4) for t in (1, 2, 3)], rel=1e-6)
    assert eps[0] < eps[1] < eps[2]
    clipped = [e.value for e in events.Scalars("privacy/clipped_fraction")]
    assert all(0 <= c <= 1 for c in clipped)
