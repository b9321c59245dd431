"""GFMFR's behaviour on the engine: grouping recovers the generator's planted
taste groups from real client uploads, a client receives exactly its group's scores at its
own items, a diverging loss is a hard failure, and configs that cannot work are refused."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from pipeline.config import load_config
from pipeline.data.prepare import PrepareConfig, prepare
from pipeline.data.synthetic import SyntheticConfig, generate
from pipeline.federated.strategy.aggregate import initial_state, participants, round_lrs
from pipeline.federated.strategy.group_server import GroupServer
from pipeline.federated.messages import TeacherDownload
from pipeline.federated.strategy.grouping import UNGROUPED
from pipeline.federated.engine.shard import Shard
from pipeline.models import model_for
from test_equivalence import synthetic
from test_fedmr_equivalence import with_features
from test_gfmfr_equivalence import make_config, run_engine


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """Every test of this module runs on one torch thread (conftest.one_torch_thread)."""


def planted(n_groups: int, seed: int = 0):
    """A clean generator setting: the taste groups alone decide what users pick (content signal
    1, fully group-specific profiles, no popularity, no content noise); content features are
    the items' true attributes per modality, one-hot (what a perfect encoder would give)."""
    syn = generate(SyntheticConfig(n_users=300, n_items=200, n_groups=n_groups, group_strength=1.0,
                                   content_signal=1.0, mean_interactions=40, affinity_beta=4.0,
                                   popularity_alpha=0.0, noise=0.0, images=False, seed=seed), progress=False)
    data = prepare(syn.dataset, PrepareConfig(min_user=0, min_item=0))
    truth = syn.truth
    assert np.array_equal(data.user_ids, np.arange(data.n_users)) and np.array_equal(data.item_ids, np.arange(200))
    features = {}
    for modality in ("image", "text"):
        parts = [np.eye(len(truth.vocabularies[name]), dtype=np.float32)[truth.item_attributes[name]]
                 for name, m in truth.attribute_modality.items() if m == modality]
        x = np.concatenate(parts, 1)
        features[modality] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return dataclasses.replace(data, features=features), truth.user_group


@pytest.mark.parametrize("n_groups", [2, 4])
def test_grouping_recovers_planted_taste_groups(n_groups, monkeypatch):
    """FedAvg's personal heads, uploaded after local training, grouped by GFMFR's default
    (standardise, spectral clustering with the median-heuristic RBF): ARI >= 0.8 against the
    generator's taste groups in every round, distillation on from round 1 (rho capped, the
    project default: with GFMFR's uncapped loss-ratio weight a few heads explode once
    distillation starts, and spectral clustering then isolates them; README, GFMFR)."""
    data, truth = planted(n_groups)
    cfg = load_config(None, ["model.backbone=fedavg", "model.dim=32", "train.lr=0.1", "train.neg_ratio=4",
                             "train.rounds=8", f"model.gfmfr={{group_num: {n_groups}, server_epochs: 5}}"])
    scores = []
    fit = GroupServer.fit

    def spy(self, round_, users, ids, *args, **kwargs):
        scores.append(adjusted_rand_score(truth[users], ids))
        return fit(self, round_, users, ids, *args, **kwargs)

    monkeypatch.setattr(GroupServer, "fit", spy)
    shards, _, groups, distilled = run_engine(cfg, data, 8, n_shards=2, dtype=torch.float32)
    assert min(distilled[1:]) == data.n_users  # everyone distilled from round 1 on
    assert len(scores) == 8 and min(scores) >= 0.8, scores
    assert set(groups.known.tolist()) == set(range(n_groups))


def test_client_receives_exactly_its_groups_scores_at_its_items():
    data = with_features(synthetic())
    cfg = make_config("fcf", "train.lr=0.01")
    init = initial_state(cfg, data.n_users, data.n_items, {m: x.shape[1] for m, x in data.features.items()})
    shard = Shard(cfg, data, None, np.arange(data.n_users), init, dtype=torch.float64)
    n_groups = cfg.model.gfmfr.group_num
    scores = torch.rand(n_groups, data.n_items, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    scores[2] = math.nan  # a group without members this round
    group_of = np.full(data.n_users, UNGROUPED)
    group_of[::3], group_of[1::3] = 0, 1
    group_of[5] = 2
    teacher = TeacherDownload(scores=scores, group_of=group_of, weight=0.5)
    received = {}
    original = Shard._distillation

    def spy(self, teacher, users, local, ws):
        distil = original(self, teacher, users, local, ws)
        for b, user in enumerate(users.tolist()):
            mine = ws.client == b
            received[user] = (ws.item[mine], distil.teacher[torch.as_tensor(mine)])
        return distil

    Shard._distillation = spy
    try:
        users = participants(data.n_users, 1.0, 0, 1)
        upload = shard.train(1, init.global_params, users, round_lrs(cfg, data.n_items, 1), teacher)
    finally:
        Shard._distillation = original
    assert upload.distilled == int(np.isin(group_of, [0, 1]).sum())  # not user 5: its group is empty
    for user, (items, values) in received.items():
        trained_items = set(data.train_items[data.train_indptr[user]:data.train_indptr[user + 1]].tolist())
        assert trained_items <= set(items.tolist())  # every positive, plus its sampled negatives
        if group_of[user] in (0, 1):
            assert torch.equal(values, scores[group_of[user]][torch.as_tensor(items)])
        else:  # no group, or an empty one: nothing to distil
            assert torch.isnan(values).all()


def test_ungrouped_clients_train_on_their_own_loss():
    """A client without a group trains exactly as without GFMFR."""
    data = with_features(synthetic())
    cfg = make_config("fedavg", "train.lr=0.2")
    plain = load_config(None, [f"{k}={v}" for k, v in (("model.backbone", "fedavg"), ("model.dim", 8),
                                                          ("train.local_epochs", 3), ("train.batch_rows", 24),
                                                          ("train.neg_ratio", 2), ("train.seed", 3),
                                                          ("train.model_seed", 5), ("train.lr", 0.2))])
    init = initial_state(cfg, data.n_users, data.n_items, {m: x.shape[1] for m, x in data.features.items()})
    nobody = TeacherDownload(scores=torch.full((3, data.n_items), 0.5, dtype=torch.float64),
                             group_of=np.full(data.n_users, UNGROUPED), weight=1.0)
    users = np.arange(data.n_users)
    results = []
    for config, teacher in ((cfg, nobody), (plain, None)):
        shard = Shard(config, data, None, users, init, dtype=torch.float64)
        shard.train(1, {k: v.double() for k, v in init.global_params.items()}, users,
                    round_lrs(config, data.n_items, 1), teacher)
        results.append(shard.store.dense["w"])
    assert torch.equal(results[0], results[1])


def test_diverging_loss_is_a_hard_failure():
    """A non-finite loss stops the run with the round and the users; nothing is skipped."""
    data = with_features(synthetic())
    cfg = make_config("fedncf", "train.lr=0.3", "train.tol=0.0")
    assert cfg.model.gfmfr.rho_max is None  # GFMFR's uncapped weight
    with pytest.raises(FloatingPointError, match="not finite"):
        run_engine(cfg, data, 4, n_shards=1)


def test_configs_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="ema_scope"):
        load_config(None, ["model.gfmfr={ema_scope: shared_sequential}"])
    with pytest.raises(ValueError, match="keep id"):
        load_config(None, ["model.fusion={modalities: [text, image]}", "model.gfmfr={}"])
    with pytest.raises(ValueError, match="planted taste groups"):
        load_config(None, ["data.name=ku", "model.gfmfr={group_method: planted}"])
    with pytest.raises(ValueError, match="plants 4 groups"):
        load_config(None, ["model.gfmfr={group_method: planted, group_num: 5}"])
    assert load_config(None, ["model.gfmfr={group_method: planted, group_num: 4}"]).model.gfmfr.group_num == 4
    cfg = load_config(None, ["model.gfmfr={}"])
    init = initial_state(cfg, 5, 7)
    with pytest.raises(ValueError, match="text or image"):
        GroupServer(cfg, model_for(cfg.model), init, {}, 5, 7)


def test_teacher_of_the_true_targets_and_the_fit_error(monkeypatch):
    """Diagnostics of the group step: with f_phi forced to reproduce the targets exactly, the
    teacher equals the teacher of the true targets and the relative error is 0; as trained, it
    is not, and the metric says by how much."""
    import pipeline.federated.strategy.group_server as group_server
    from pipeline.models.group_fusion import GroupFusion

    data = with_features(synthetic())
    cfg = make_config("fcf", "train.lr=0.02", "train.tol=0.05")
    monkeypatch.setattr(GroupServer, "keep_target_scores", True)
    errors = []
    step = GroupServer.step
    monkeypatch.setattr(GroupServer, "step", lambda self, *a: errors.append(step(self, *a)) or errors[-1])
    _, _, trained, _ = run_engine(cfg, data, 2, n_shards=1)
    assert trained.target_scores.shape == trained.scores.shape
    assert (trained.target_scores - trained.scores).abs().nan_to_num().max() > 1e-3
    assert all(0 < e["group/fusion_relative_error"] for e in errors)

    exact = {}
    targets = group_server.targets_from_sums
    monkeypatch.setattr(group_server, "targets_from_sums", lambda *a: exact.setdefault("t", targets(*a)))
    monkeypatch.setattr(GroupFusion, "tables", lambda self, features, n_items: exact["t"])
    errors.clear()
    _, _, perfect, _ = run_engine(cfg, data, 1, n_shards=1)
    assert torch.equal(perfect.scores.nan_to_num(), perfect.target_scores.nan_to_num())
    assert errors[0]["group/fusion_relative_error"] == 0.0


def test_group_step_device_and_early_stop(monkeypatch):
    """The group fusion model trains on the server's device (the CPU here: no GPU, or
    runtime.device=cpu) and checkpoints from the CPU; by default it runs every server epoch,
    model.gfmfr.server_tol ends them early (tol 1: after the second epoch, whatever it gained),
    and the teacher then differs from the full run's."""
    from pipeline.federated.strategy.group_server import server_device

    data = with_features(synthetic())
    runs, step = {}, GroupServer.step
    for name, tol in (("full", "null"), ("stopped", "1.0")):
        cfg = make_config("fcf", "train.lr=0.005", "runtime.device=auto", gfmfr=f"group_num: 3, server_epochs: 4, "
                          f"group_emb_dim: 16, server_batch: 64, server_tol: {tol}")
        epochs = []

        def counted(self, *args, _step=step, _epochs=epochs):
            metrics = _step(self, *args)
            _epochs.append(metrics["group/fusion_epochs"])
            return metrics

        monkeypatch.setattr(GroupServer, "step", counted)
        _, _, groups, _ = run_engine(cfg, data, 2, n_shards=1)
        runs[name] = (epochs, groups)
    assert runs["full"][0] == [4, 4] and runs["stopped"][0] == [2, 2]
    assert not torch.allclose(runs["full"][1].scores.nan_to_num(), runs["stopped"][1].scores.nan_to_num())
    groups = runs["full"][1]
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert groups.device.type == expected == groups.fusion.group.device.type
    assert server_device(make_config("fcf", "runtime.device=cpu").runtime).type == "cpu"
    assert all(t.device.type == "cpu" for t in groups.state_dict()["fusion"].values())
    assert groups.scores.device.type == "cpu"


def test_regroup_every(monkeypatch):
    """model.gfmfr.regroup_every: the default (1) clusters every round; k = 3 clusters in rounds
    0 and 3 only, and in rounds 1, 2, 4 participants grouped before keep their latest ids (new
    ones join a group); its grouping rounds compute what the default computes."""
    import pipeline.federated.strategy.grouping as grouping

    data = with_features(synthetic())
    assert load_config(None, ["model.gfmfr={}"]).model.gfmfr.regroup_every == 1
    clustered, kept, cluster, fit = [], [], grouping.cluster, GroupServer.fit

    def counted(x, n_groups, method, seed, round_):
        clustered.append(round_)
        return cluster(x, n_groups, method, seed, round_)

    def spy(self, round_, users, ids, *args, **kwargs):
        before = self.known[users]  # fit updates the memberships at its end
        seen = before != UNGROUPED
        kept.append((round_, int(seen.sum()), bool(np.array_equal(ids[seen], before[seen]))))
        return fit(self, round_, users, ids, *args, **kwargs)

    monkeypatch.setattr(grouping, "cluster", counted)
    monkeypatch.setattr(GroupServer, "fit", spy)
    runs = {}
    for every in (1, 3):
        clustered.clear(), kept.clear()
        cfg = make_config("fcf", "train.rounds=5", "train.participation=0.5", "train.lr=0.02", "train.tol=0.05",
                          gfmfr=f"group_num: 3, server_epochs: 2, group_emb_dim: 16, regroup_every: {every}")
        runs[every] = run_engine(cfg, data, 5, n_shards=2)[2], list(clustered), list(kept)
    assert runs[1][1] == [0, 1, 2, 3, 4] and runs[3][1] == [0, 3]
    between = [k for k in runs[3][2] if k[0] in (1, 2, 4)]
    assert len(between) == 3 and all(n > 0 and same for _, n, same in between), runs[3][2]
    assert not all(same for r, _, same in runs[1][2] if r > 0)  # the default does regroup them
    assert not torch.equal(runs[1][0].scores.nan_to_num(), runs[3][0].scores.nan_to_num())

    firsts = []  # a grouping round computes what the default computes
    for every in (1, 3):
        cfg = make_config("fcf", "train.rounds=5", "train.participation=0.5", "train.lr=0.02", "train.tol=0.05",
                          gfmfr=f"group_num: 3, server_epochs: 2, group_emb_dim: 16, regroup_every: {every}")
        firsts.append(run_engine(cfg, data, 1, n_shards=2)[2])
    assert torch.equal(firsts[0].scores.nan_to_num(), firsts[1].scores.nan_to_num())
    assert np.array_equal(firsts[0].known, firsts[1].known)
