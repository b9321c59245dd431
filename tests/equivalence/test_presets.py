"""The originals' training recipes (train.preset and the knobs they set): the vectorised engine
against the one-client-at-a-time oracle under every preset (float64, same seed), each knob
shown to take effect, and the presets' values and refusals."""

from __future__ import annotations

from typing import get_args

import numpy as np
import pytest
import torch
from test_equivalence import (ATOL, engine_dense, engine_scores, initial_dense_state, make_config, max_diffs,
                              moved, oracle_scores, run_engine, run_oracle, synthetic)

from pipeline.config import BACKBONES, Preset, load_config, preset_backbones
from pipeline.data.prepare import PrepareConfig, prepare
from pipeline.data.schema import Interactions, RawDataset
from pipeline.federated.strategy.aggregate import round_lrs


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """Every test of this module runs on one torch thread (conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def data():
    return synthetic()


# Each preset on the small test model, with its learning rates scaled to it (the presets' own
# rates are for 1,682 items) and weight decay and per-batch decay strong enough to matter in 3 rounds.
PRESET_VARIANTS = {
    "pfedrec_paper": ("pfedrec", "train.preset=pfedrec_paper", "model.pfedrec_eta=0.5",
                      "train.weight_decay=0.02", "train.lr_batch_decay=0.9"),
    "pfedrec_paper-joint": ("pfedrec", "train.preset=pfedrec_paper", "model.pfedrec_update=joint",
                            "train.lr_groups={head: 0.3, item: 0.05*n}", "train.weight_decay=0.02"),
    "fedmf_paper": ("fcf", "train.preset=fedmf_paper", "train.lr_groups={head: 0.3, item: 0.05*n}",
                    "train.weight_decay=0.05", "train.lr_batch_decay=0.9"),
    "fedncf_paper": ("fedncf", "train.preset=fedncf_paper", "train.lr=0.3",
                     "train.lr_groups={item: 0.3, user: 0.5, network: 0.2}", "train.weight_decay=0.01",
                     "train.lr_batch_decay=0.9"),
    "fedrap_paper": ("fedrap", "train.preset=fedrap_paper", "train.local_epochs=3",
                     "train.lr_groups={head: 0.3, item_personal: 8, item_global: 0.05*n}",
                     "model.fedrap_lambda=2.0", "model.fedrap_mu=1.0", "train.weight_decay=0.01"),
    "fedrap_paper-original-pool": ("fedrap", "train.preset=fedrap_paper", "train.neg_exclude_heldout=true",
                                   "train.lr_groups={head: 0.3, item_personal: 8, item_global: 8}",
                                   "train.weight_decay=0.01", "train.participation=0.5"),
    # the project's defaults: PFedRec scores with the global table, FedRAP without the -lambda term
    "default-pfedrec": ("pfedrec", "train.preset=default", "model.pfedrec_eta=0.5", "train.participation=0.5"),
    "default-fedrap": ("fedrap", "train.preset=default", "train.lr_groups={head: 0.3, item_global: 0.05*n}",
                       "model.fedrap_mu=1.0"),
}


def preset_config(variant, *more):
    backbone, *extra = PRESET_VARIANTS[variant]
    return make_config(backbone, *extra, *more)


@pytest.mark.parametrize("variant", list(PRESET_VARIANTS))
def test_engine_matches_oracle_under_preset(data, variant):
    cfg = preset_config(variant)
    assert cfg.train.preset is not None and cfg.model.init == "torch" and cfg.train.neg_draw == "round"
    if variant == "default-pfedrec":
        assert cfg.model.pfedrec_eval_table == "global"
    rounds = 3
    shards, g = run_engine(cfg, data, rounds, n_shards=3)
    oracle = run_oracle(cfg, data, rounds)
    initial = initial_dense_state(cfg, data.n_users, data.n_items)
    if cfg.model.backbone == "pfedrec":
        for user in oracle.personal:
            if "item" in oracle.personal[user]:
                initial.personal[user]["item"] = initial.globals["item"]
    if cfg.model.pfedrec_eval_table == "global" and cfg.model.backbone == "pfedrec":
        # the engine keeps no fine-tuned copies when they never score; the oracle's are unused
        for user in oracle.personal:
            oracle.personal[user].pop("item", None)
            initial.personal[user].pop("item", None)
    assert moved(initial, oracle) > 1e-2
    diffs = max_diffs(engine_dense(shards, g, data.n_items), oracle)
    assert max(diffs.values()) < ATOL, diffs
    users = list(range(data.n_users))
    s_engine = engine_scores(shards, g, data.n_users, data.n_items)
    assert (s_engine - oracle_scores(cfg, oracle, users, data.n_items)).abs().max().item() < ATOL


@pytest.mark.parametrize("change", ["train.weight_decay=0", "train.lr_batch_decay=1", "model.init=xavier",
                                    "train.neg_draw=epoch", "train.lr_groups={}", "model.fedrap_schedule=ramp"])
def test_every_knob_takes_effect(data, change):
    """Turning one knob back changes the trained model far beyond the tolerance, in the engine:
    the equivalence above is not vacuous for any of them."""
    variant = "fedrap_paper"
    base_shards, base_g = run_engine(preset_config(variant), data, 2, n_shards=1)
    other_shards, other_g = run_engine(preset_config(variant, change), data, 2, n_shards=1)
    assert moved(engine_dense(base_shards, base_g, data.n_items),
                 engine_dense(other_shards, other_g, data.n_items)) > 100 * ATOL


def test_weight_decay_scales_rows_never_touched(data):
    """Weight decay reaches every row of an item table, not only the working set: an item that
    no client of the round touched shrinks in the global table, and in a personal table."""
    cfg = preset_config("fedrap_paper", "train.participation=0.5")
    shards, g = run_engine(cfg, data, 1, n_shards=2)
    init = initial_dense_state(cfg, data.n_users, data.n_items)
    ratio = (g["item_global"] / init.globals["item_global"].double())
    # untouched rows of a client shrink by one common factor < 1, so the mean factor is below 1
    assert float(ratio.median()) < 1.0
    dense = engine_dense(shards, g, data.n_items)
    trained_user = next(u for u, p in dense.personal.items()
                        if not torch.equal(p["item_personal"], init.personal[u]["item_personal"].double()))
    p_ratio = dense.personal[trained_user]["item_personal"] / init.personal[trained_user]["item_personal"].double()
    assert float(p_ratio.median()) < 1.0


def test_presets_hold_the_originals_settings():
    pfedrec = load_config(None, ["model.backbone=pfedrec", "train.preset=pfedrec_paper"])
    assert (pfedrec.model.dim, pfedrec.model.init, pfedrec.model.pfedrec_eta) == (32, "torch", 80.0)
    assert (pfedrec.train.local_epochs, pfedrec.train.rows_per_batch(), pfedrec.train.neg_ratio) == (1, 256, 4)
    assert round_lrs(pfedrec, 1682, 5) == {"item": pytest.approx(0.1 * 1682 * 80), "w": 0.1, "b": 0.1}
    assert pfedrec.data.protocol.tie_rule == "first" and not pfedrec.train.neg_exclude_heldout
    fedmf = load_config(None, ["model.backbone=fcf", "train.preset=fedmf_paper"])
    assert round_lrs(fedmf, 1682, 5) == {"item": pytest.approx(0.1 * 1682 * 80), "w": 0.1, "b": 0.1}
    fedncf = load_config(None, ["model.backbone=fedncf", "train.preset=fedncf_paper"])
    lrs = round_lrs(fedncf, 1682, 0)
    assert (lrs["item_mf"], lrs["user_mf"], lrs["tower.0.weight"]) == (pytest.approx(0.1 * 1682 * 80), 5.0, 0.1)
    assert round_lrs(fedncf, 1682, 10)["user_mf"] == pytest.approx(5.0 * 0.98 ** 10)
    fedrap = load_config(None, ["model.backbone=fedrap", "train.preset=fedrap_paper"])
    lrs = round_lrs(fedrap, 1682, 2)
    assert lrs["item_personal"] == lrs["item_global"] == pytest.approx(200 * 0.97 ** 2)
    assert lrs["w"] == pytest.approx(0.5 * 0.97 ** 2)
    assert (fedrap.train.weight_decay, fedrap.train.lr_batch_decay, fedrap.model.fedrap_schedule) == (
        1e-4, 0.95, "constant")
    assert (fedrap.train.local_epochs, fedrap.train.rows_per_batch()) == (10, 2048)
    # a key given explicitly wins over the preset
    assert load_config(None, ["model.backbone=pfedrec", "train.preset=pfedrec_paper",
                              "model.dim=16"]).model.dim == 16
    reference = load_config(None, ["model.backbone=fcf", "train.preset=fedmr_reference"])
    assert reference.model_dump(exclude={"train": {"preset"}}) == load_config(
        None, ["model.backbone=fcf"]).model_dump(exclude={"train": {"preset"}})
    # every preset name is some backbone's recipe; default and fedmr_reference are every backbone's
    assert {name: preset_backbones(name) for name in get_args(Preset)} == {
        "default": list(BACKBONES), "fedmr_reference": list(BACKBONES), "pfedrec_paper": ["pfedrec"],
        "fedmf_paper": ["fedavg", "fcf"], "fedncf_paper": ["fedncf"], "fedrap_paper": ["fedrap"]}


@pytest.mark.parametrize("backbone", ["fedavg", "fcf", "fedncf", "pfedrec", "fedrap"])
def test_default_recipe_serves_every_backbone_with_fusion(backbone):
    """train.preset=default has a recipe for every backbone, in the PFedRec paper's loop, and
    sets nothing the fusion path refuses, so FedMR and GFMFR configs can name it too."""
    cfg = load_config(None, [f"model.backbone={backbone}", "train.preset=default"])
    assert (cfg.model.init, cfg.model.dim, cfg.train.local_epochs, cfg.train.rows_per_batch()) == ("torch", 32, 1, 256)
    assert cfg.train.weight_decay == 0 and cfg.train.lr_batch_decay == 1 and not cfg.train.neg_exclude_heldout
    fused = load_config(None, [f"model.backbone={backbone}", "train.preset=default", "model.fusion={d_f: 32}",
                               "model.gfmfr={}"])
    assert fused.model.fusion is not None and fused.train.lr_groups == cfg.train.lr_groups


@pytest.mark.parametrize("overrides, message", [
    (["model.backbone=fcf", "train.preset=pfedrec_paper"], "recipe of pfedrec"),
    (["model.backbone=fcf", "train.lr_groups={P: 1}"], "not a parameter group of fcf"),
    (["model.backbone=fcf", "train.lr_groups={item: 3*m}"], r"expected a number or 'K\*n'"),
    (["model.backbone=fcf", "train.lr_groups={item: -1}"], "positive"),
    (["model.backbone=fcf", "train.weight_decay=0.1", "model.fusion={}"], "with model.fusion"),
    (["model.backbone=fcf", "train.lr_batch_decay=0.9", "privacy={clip: 1, noise_multiplier: 0}"], "with privacy"),
])
def test_bad_recipe_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_leave_one_out_tie_rule():
    """Among a user's rows with the same latest timestamp, 'last' holds out the last in file
    order, 'first' the first (pandas rank(method='first') on descending time)."""
    user = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1])
    item = np.array([10, 11, 12, 13, 14, 10, 11, 12, 13])
    time = np.array([1, 2, 5, 5, 5, 1, 2, 3, 4])
    raw = RawDataset("ties", Interactions(user, item, time))
    last = prepare(raw, PrepareConfig(min_user=0, min_item=0))
    first = prepare(raw, PrepareConfig(min_user=0, min_item=0, tie_rule="first"))
    ids = last.item_ids
    assert (ids[last.test_item[0]], ids[last.valid_item[0]]) == (14, 13)
    assert (ids[first.test_item[0]], ids[first.valid_item[0]]) == (12, 13)
    assert sorted(ids[first.train_items[first.train_indptr[0]:first.train_indptr[1]]]) == [10, 11, 14]
    for split in (last, first):  # no ties: both rules agree
        assert (ids[split.test_item[1]], ids[split.valid_item[1]]) == (13, 12)
    assert last.fingerprint() != first.fingerprint()


def test_weight_decay_state_survives_a_checkpoint(data, tmp_path):
    """A run checkpointed mid-way (the pools' stores with the per-user scales of FedRAP's P and of
    PFedRec's trained copies included) and resumed in new pools continues exactly as the
    uninterrupted run."""
    import torch

    from pipeline.federated.runtime.checkpoints import Checkpoints
    from pipeline.federated.rounds import in_process, run_rounds

    for variant in ("fedrap_paper", "pfedrec_paper"):
        cfg = preset_config(variant, "train.participation=0.5", "runtime.checkpoint_every=2", "train.eval_every=100",
                            "train.eval_round0=false")
        straight, straight_pools = in_process(cfg, data, dtype=torch.float64)
        run_rounds(straight, straight_pools, rounds=3)
        first, first_pools = in_process(cfg, data, dtype=torch.float64)
        checkpoints = Checkpoints(tmp_path / variant)
        run_rounds(first, first_pools, rounds=2, checkpoints=checkpoints)
        saved = torch.load(checkpoints.latest() / "pool-0.pt", weights_only=False)
        assert saved["table_scale"] or saved["copy_scale"]
        second, second_pools = in_process(cfg, data, dtype=torch.float64)
        assert Checkpoints.load(checkpoints.latest(), second, second_pools) == 2
        run_rounds(second, second_pools, rounds=1)
        diffs = max_diffs(engine_dense(straight_pools.pools, straight.globals, data.n_items),
                          engine_dense(second_pools.pools, second.globals, data.n_items))
        assert max(diffs.values()) < 1e-12, (variant, diffs)
