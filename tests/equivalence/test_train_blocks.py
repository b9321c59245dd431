"""Shard.train in blocks of clients (runtime.train_block_clients): a round trained a few
clients at a time sends the same upload and leaves the same personal state as the round
trained at once, up to float summation order (float64 here), for ID backbones, FedMR,
GFMFR, both, PFedRec's trained copies, weight decay and privacy clipping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import pipeline.federated.engine.shard as shard_module
import test_equivalence as ids
import test_fedmr_equivalence as fedmr
import test_gfmfr_equivalence as gfmfr
from pipeline.federated.strategy.aggregate import feature_dims, initial_state, round_lrs
from pipeline.federated.engine.shard import Shard
from test_privacy import MEDIAN_NORM

ATOL = 1e-10
BLOCK = "runtime.train_block_clients=3"  # the synthetic data's 30 users: about ten blocks per shard
ONE = "runtime.train_block_clients=null"


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """One torch thread (conftest.one_torch_thread)."""


@pytest.fixture(autouse=True)
def feature_spans(monkeypatch):
    """FedMR's projections as working-set spans wherever the Gram matrix fits (as in
    test_fedmr_equivalence); spans=False tests set SPAN_MAX_ITEMS = 0."""
    monkeypatch.setattr(shard_module, "SPAN_ITEMS_PER_WIDTH", math.inf)


@pytest.fixture(scope="module")
def data():
    return fedmr.with_features(ids.synthetic())


@pytest.fixture
def blocks(monkeypatch):
    """Counts the blocks Shard.train trains."""
    count = []
    original = Shard._train_block
    monkeypatch.setattr(Shard, "_train_block", lambda self, *a: count.append(1) or original(self, *a))
    return count


def assert_same_uploads(a, b):
    assert (a.clients, a.rows, a.distilled, a.clipped) == (b.clients, b.rows, b.distilled, b.clipped)
    assert math.isclose(a.weight, b.weight, rel_tol=1e-12) and math.isclose(a.loss_sum, b.loss_sum, rel_tol=1e-12)
    assert a.table_items.keys() == b.table_items.keys()
    for name in a.table_items:
        assert torch.equal(a.table_items[name], b.table_items[name])
    for field in ("table_sums", "dense_sums", "grad_sums"):
        one, other = getattr(a, field), getattr(b, field)
        assert one.keys() == other.keys(), field
        for name in one:
            assert (one[name] - other[name]).abs().max().item() < ATOL, (field, name)
    assert a.table_scale_sums.keys() == b.table_scale_sums.keys()
    for name in a.table_scale_sums:
        assert math.isclose(a.table_scale_sums[name], b.table_scale_sums[name], rel_tol=1e-12, abs_tol=1e-12)
    assert math.isclose(a.rho[0], b.rho[0], rel_tol=1e-12) and a.rho[1] == b.rho[1]
    assert (a.group_users is None) == (b.group_users is None)
    if a.group_users is not None:
        assert np.array_equal(a.group_users, b.group_users)
        assert (a.group_vectors - b.group_vectors).abs().max().item() < ATOL
    assert (a.group_alpha is None) == (b.group_alpha is None)
    if a.group_alpha is not None:
        assert (a.group_alpha - b.group_alpha).abs().max().item() < ATOL


def assert_same_state(shards_a, g_a, shards_b, g_b, data, atol=ATOL):
    diffs = ids.max_diffs(ids.engine_dense(shards_a, g_a, data.n_items), ids.engine_dense(shards_b, g_b, data.n_items))
    assert max(diffs.values()) < atol, diffs
    scores = ids.engine_scores(shards_a, g_a, data.n_users, data.n_items) - \
        ids.engine_scores(shards_b, g_b, data.n_users, data.n_items)
    assert scores.abs().max().item() < atol


# one round on one shard: the upload itself
ROUND = {
    "fcf": (ids.make_config, ("fcf", "train.tol=0.4")),
    "fcf-weight_decay": (ids.make_config, ("fcf", "train.tol=0.4", "train.weight_decay=0.1")),
    "fedrap-l1": (ids.make_config, ids.VARIANTS["fedrap-l1"]),
    "pfedrec-two_step": (ids.make_config, ids.VARIANTS["pfedrec-two_step"]),
    "fcf-privacy": (ids.make_config, ("fcf", "train.tol=0.4", f"privacy.clip={MEDIAN_NORM['fcf']}",
                                      "privacy.noise_multiplier=0")),
    "fedmr-fedrap": (fedmr.make_config, ("fedrap", fedmr.MOE, "model.fedrap_lambda=2.0", "train.tol=0.6")),
    "fedmr-pfedrec-grad_adam": (fedmr.make_config, ("pfedrec", f"{fedmr.MOE}, fusion_agg: grad_adam, server_lr: 0.01")),
    "fedmr-fcf-privacy": (fedmr.make_config, ("fcf", fedmr.MOE, "privacy.clip=7.5", "privacy.noise_multiplier=0")),
    "gfmfr-fcf": (gfmfr.make_config, gfmfr.VARIANTS["fcf"]),
    "gfmfr-fcf+fedmr": (gfmfr.make_config, gfmfr.FEDMR_VARIANTS["fcf+fedmr"]),
}


# spans (the feature projection's rows per item) are FedMR's: its variants also run without them
CASES = [(variant, True) for variant in ROUND] + [(variant, False) for variant in ROUND if "fedmr" in variant]


@pytest.mark.parametrize(("variant", "spans"), CASES)
def test_a_round_in_blocks_uploads_the_same(data, variant, spans, blocks, monkeypatch):
    if not spans:
        monkeypatch.setattr(shard_module, "SPAN_MAX_ITEMS", 0)
    make, (backbone, *extra) = ROUND[variant]
    ups, shards = [], []
    for size in (ONE, BLOCK):
        cfg = make(backbone, *extra, size)
        init = initial_state(cfg, data.n_users, data.n_items, feature_dims(data))
        shard = Shard(cfg, data, None, np.arange(data.n_users), init, dtype=torch.float64)
        assert bool(shard.grams) == (spans and "fedmr" in variant)
        g = {k: v.double() for k, v in init.global_params.items()}
        users = np.arange(0, data.n_users, 1)[::-1].copy()  # (Shard.train sorts them)
        ups.append(shard.train(0, g, users, round_lrs(cfg, data.n_items, 0)))
        shards.append(shard)
    assert len(blocks) == 1 + math.ceil(data.n_users / 3)
    assert_same_uploads(*ups)
    if "privacy" in variant:
        assert 0 < ups[0].clipped < ups[0].clients
    for name, value in shards[0].store.dense.items():
        assert torch.allclose(value, shards[1].store.dense[name], atol=ATOL, rtol=0, equal_nan=True), name
    a, b = shards
    for name in a.store.tables:
        assert torch.equal(a.store.tables[name].keys, b.store.tables[name].keys)
        assert (a.store.tables[name].values - b.store.tables[name].values).abs().max().item() < ATOL
    for name in a.store.copies:  # PFedRec: one segment for the round, whatever the blocks
        assert a.store.copies[name].keys() == b.store.copies[name].keys() == {0}
        assert torch.equal(a.store.copies[name][0].keys, b.store.copies[name][0].keys)
        assert (a.store.copies[name][0].values - b.store.copies[name][0].values).abs().max().item() < ATOL
    assert a.store.segment_users == b.store.segment_users
    if a._for_groups is not None:
        for x, y in zip(a._for_groups, b._for_groups):
            assert (x.double() - y.double()).abs().max().item() < ATOL


@pytest.mark.parametrize("variant", ["fedrap-l1", "pfedrec-two_step", "fedncf"])
def test_rounds_in_blocks_id(data, variant):
    backbone, *extra = ids.VARIANTS[variant]
    one = ids.run_engine(ids.make_config(backbone, "train.participation=0.7", *extra, ONE), data, 3, n_shards=2)
    blocked = ids.run_engine(ids.make_config(backbone, "train.participation=0.7", *extra, BLOCK), data, 3, n_shards=2)
    assert_same_state(*one, *blocked, data)


@pytest.mark.parametrize("variant", ["fedrap", "pfedrec-grad_adam", "fcf-batch-double-no_ln"])
def test_rounds_in_blocks_fedmr(data, variant):
    backbone, fusion, extra, _ = fedmr.VARIANTS[variant]
    one = fedmr.run_engine(fedmr.make_config(backbone, fusion, *extra, ONE), data, 2, n_shards=2)
    blocked = fedmr.run_engine(fedmr.make_config(backbone, fusion, *extra, BLOCK), data, 2, n_shards=2)
    assert_same_state(*one, *blocked, data)


@pytest.mark.parametrize("variant", ["fcf", "fcf+fedmr"])
def test_rounds_in_blocks_gfmfr(data, variant):
    """Distillation from the group teachers (rounds 1, 2) and the per-group sums of the
    group-table changes, trained in blocks: the same run."""
    backbone, *extra = {**gfmfr.VARIANTS, **gfmfr.FEDMR_VARIANTS}[variant]
    s1, g1, _, d1 = gfmfr.run_engine(gfmfr.make_config(backbone, *extra, ONE), data, gfmfr.RUN, n_shards=2)
    sb, gb, _, db = gfmfr.run_engine(gfmfr.make_config(backbone, *extra, BLOCK), data, gfmfr.RUN, n_shards=2)
    assert d1 == db and sum(d1) > 0
    # the loss-ratio weight amplifies summation-order differences (test_gfmfr_equivalence.RUN)
    assert_same_state(s1, g1, sb, gb, data, atol=1e-8)


def test_training_reports_each_block_of_clients_as_it_finishes(data):
    """What the progress bar counts as 'clients trained': one report per block, summing to the round."""
    cfg = ids.make_config("fcf", "train.tol=0.4", BLOCK)
    init = initial_state(cfg, data.n_users, data.n_items, feature_dims(data))
    shard = Shard(cfg, data, None, np.arange(data.n_users), init, dtype=torch.float64)
    g = {k: v.double() for k, v in init.global_params.items()}
    seen = []
    upload = shard.train(0, g, np.arange(0, data.n_users, 2), round_lrs(cfg, data.n_items, 0), progress=seen.append)
    assert seen == [3] * (upload.clients // 3) + ([upload.clients % 3] if upload.clients % 3 else [])
    assert sum(seen) == upload.clients == len(range(0, data.n_users, 2))
