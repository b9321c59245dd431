"""One test per known defect of the FedMR reference implementation,
each showing the project's correct behaviour on the engine with FedMR plugged in."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.federated.strategy.aggregate import apply_fusion_grads, apply_uploads, feature_dims, initial_state
from pipeline.federated.rounds import in_process, run_rounds
from reference.oracle import oracle_scores_fedmr
from pipeline.federated.strategy.selection import Selection
from pipeline.federated.messages import Upload
from pipeline.federated.engine.scoring import EvalRows
from pipeline.federated.engine.state import PersonalStore
from pipeline.models import model_for
from pipeline.models.fusion import PREFIX
from test_equivalence import synthetic
from test_fedmr_equivalence import MOE, engine_scores, make_config, run_engine, run_oracle, with_features

ROUTER = ("fedmr.router.fc1.weight", "fedmr.router.fc1.bias", "fedmr.router.fc2.weight", "fedmr.router.fc2.bias")


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """Every test of this module runs on one torch thread (conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def data():
    return with_features(synthetic())


class Recorded:
    """In-process pools (backend.LocalPools) that keep what each round sent the server: the users
    trained and the pools' uploads."""

    def __init__(self, pools):
        self.inner, self.users, self.uploads = pools, [], []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def train(self, round_, plan, users, progress, phase):
        self.users.append(np.concatenate(users))
        self.uploads.append(self.inner.train(round_, plan, users, progress, phase))
        return self.uploads[-1]


def started(cfg, data, n_shards=2):
    """A run of the product's round loop in this process (float64): (initial state, strategy,
    recording pools)."""
    strategy, pools = in_process(cfg, data, n_pools=n_shards, dtype=torch.float64)
    return strategy.initial, strategy, Recorded(pools)


def one_round(strategy, pools):
    """The next round, played by rounds.run_rounds: its trained users, the pools' uploads and the
    new global parameters."""
    run_rounds(strategy, pools, rounds=1)
    return pools.users[-1], pools.uploads[-1], strategy.globals


def personal_of(shards, user):
    for shard in shards:
        if user in shard.users:
            pos = int(np.searchsorted(shard.users, user))
            return {k: v[pos].clone() for k, v in shard.store.dense.items()}
    raise KeyError(user)


def changed(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


# --- personal state never restored --------------------------------------------------------------


def test_d1_personal_state_persists_across_rounds(data):
    cfg = make_config("fedrap", MOE, "train.participation=0.5")
    init, strategy, pools = started(cfg, data)
    users0, _, g = one_round(strategy, pools)
    server_after0 = copy.deepcopy(strategy.state_dict())
    shards = pools.pools
    after0 = {u: personal_of(shards, u) for u in range(data.n_users)}
    for u in users0.tolist():  # trained users keep what they learned: head and local router
        for name in ("w", "b", *ROUTER):
            assert changed(after0[u][name], init.personal_shared[name]) > 1e-6, (u, name)
    users1, _, g1 = one_round(strategy, pools)
    for u in set(range(data.n_users)) - set(users1.tolist()):  # not sampled: state untouched
        mine = personal_of(shards, u)
        assert all(torch.equal(mine[k], after0[u][k]) for k in mine)
    # round 1 started from the persisted state: restarting it with the server's state restored but
    # the clients' from the initial model (the reference's no-op restore) trains to something else
    _, restarted, fresh_pools = started(cfg, data)
    restarted.load_state_dict(server_after0)
    one_round(restarted, fresh_pools)
    fresh = fresh_pools.pools
    both = sorted(set(users0.tolist()) & set(users1.tolist()))
    assert both and all(changed(personal_of(shards, u)["w"], personal_of(fresh, u)["w"]) > 1e-6 for u in both)
    # and the state survives a checkpoint of the pool (routers included)
    store = shards[0].store
    restored = PersonalStore(shards[0].model, init, store.users, data.n_items, torch.float64)
    restored.load_state_dict(store.state_dict())
    assert all(torch.equal(restored.dense[k], store.dense[k]) for k in (*ROUTER, "w", "b"))


# --- evaluation with initial personal parameters -------------------------------------------------


def test_d2_evaluation_uses_each_users_own_persisted_state(data):
    cfg = make_config("fcf", MOE)
    shards, g = run_engine(cfg, data, 2, n_shards=2)
    scores = engine_scores(shards, g, data.n_users, data.n_items)
    oracle = run_oracle(cfg, data, 2)
    assert (scores - oracle_scores_fedmr(cfg, data, oracle, list(range(data.n_users)))).abs().max() < 1e-8
    # the reference evaluated everyone with the initial heads and routers: a different model
    _, _, fresh = started(cfg, data)
    initial_heads = engine_scores(fresh.pools, g, data.n_users, data.n_items)
    assert ((scores - initial_heads).abs().amax(1) > 1e-6).all()


# --- vision input replaced by zeros ----------------------------------------------------------------


def test_d3_real_image_features_reach_the_module(data):
    cfg = make_config("fcf", MOE)
    init, strategy, pools = started(cfg, data, n_shards=1)
    shard = pools.pools[0]
    assert torch.equal(shard.features["image"], torch.as_tensor(data.features["image"]).double())
    assert shard.features["image"].abs().sum() > 0
    _, _, g = one_round(strategy, pools)
    assert changed(g["fedmr.proj.image.weight"], init.global_params["fedmr.proj.image.weight"]) > 1e-4
    users = torch.arange(data.n_users)
    before = shard.scores(g, users)
    real = shard.features["image"]
    shard.features["image"] = torch.roll(real, 1, 0)  # other items' images
    assert (shard.scores(g, users) - before).abs().max() > 1e-4
    shard.features["image"] = torch.zeros_like(real)  # what the 2024 code fed
    assert (shard.scores(g, users) - before).abs().max() > 1e-4
    shard.features["image"] = real
    # zeros only as an explicit ablation: the modality and its parameters are then gone
    ablated = make_config("fcf", f"{MOE}, modalities: [id, text]")
    init2, strategy2, pools2 = started(ablated, data, n_shards=1)
    shards2 = pools2.pools
    assert not any("image" in k for k in init2.global_params)
    assert init2.global_params["fedmr.mlp.fc1.weight"].shape[1] == 2 * 8  # M = 2 inputs, no zero block
    _, _, g2 = one_round(strategy2, pools2)
    before = shards2[0].scores(g2, users)
    shards2[0].features["image"] = torch.zeros(data.n_items, 10, dtype=torch.float64)
    assert torch.equal(shards2[0].scores(g2, users), before)


# --- the server fusion never updates ----------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["fedrap", "pfedrec"])
@pytest.mark.parametrize("agg", ["fedavg", "grad_adam"])
def test_d4_server_fusion_changes_after_every_round(data, backbone, agg):
    cfg = make_config(backbone, f"{MOE}, fusion_agg: {agg}")
    init = initial_state(cfg, data.n_users, data.n_items, feature_dims(data))
    names = [k for k in init.global_params if k.startswith(PREFIX)]
    assert names and not any(k in init.global_params for k in ROUTER)
    previous = {k: v.double() for k, v in init.global_params.items()}
    for rounds in (1, 2):
        _, g = run_engine(cfg, data, rounds, n_shards=2)
        for name in names:
            assert changed(g[name], previous[name]) > 1e-7, (rounds, name)
        previous = g


# --- MM-PFedRec: fusion not trained, several server steps, table not uploaded, grads as weights -----


def test_d5_pfedrec_fusion_trains_locally_one_server_step_table_uploaded(data):
    lr = 0.01
    cfg = make_config("pfedrec", f"{MOE}, fusion_agg: grad_adam, server_lr: {lr}")
    init, strategy, pools = started(cfg, data, n_shards=3)
    for round_ in range(3):
        g = strategy.globals
        _, uploads, new = one_round(strategy, pools)
        fusion = [k for k in g if k.startswith(PREFIX)]
        for up in uploads:  # the fusion was trained locally: its gradients are uploaded ...
            assert set(up.grad_sums) == set(fusion) and not set(up.dense_sums) & set(fusion)
            assert any(up.grad_sums[k].abs().max() > 0 for k in fusion)
            assert "item" in up.table_items  # ... and so is the fine-tuned ID table
        assert changed(new["item"], g["item"]) > 1e-6  # which the server averaged
        averaged = {k: sum(u.grad_sums[k] for u in uploads) / sum(u.weight for u in uploads) for k in fusion}
        assert strategy.fusion_adam["step"] == round_ + 1  # exactly one server step per round (3 pools, 30 clients)
        if round_ == 0:  # Adam's first step moves every coordinate by lr * g / (|g| + eps): not g itself
            for k in fusion:
                step, grad = (new[k] - g[k]).abs(), averaged[k].abs()
                big = grad > 1e-4
                assert torch.allclose(step[big], torch.full_like(step[big], lr), rtol=1e-3)
                assert not torch.allclose(new[k], averaged[k])
    # fedavg aggregation: the locally trained fusion weights are averaged instead
    _, strategy, pools = started(make_config("pfedrec", MOE), data)
    _, uploads, _ = one_round(strategy, pools)
    assert any(u.dense_sums["fedmr.proj.text.weight"].abs().max() > 1e-6 for u in uploads)


# --- unnormalised weighted averaging ---------------------------------------------------------------


def test_d6_averaging_weights_sum_to_one(data):
    theta = {"fedmr.proj.text.weight": torch.randn(4, 3, dtype=torch.float64),
             "item": torch.randn(5, 2, dtype=torch.float64)}
    delta, grad = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    rows = torch.tensor([1, 3]), torch.randn(2, 2, dtype=torch.float64)
    # every client moved by the same delta: the weighted mean moves by exactly that delta
    uploads = [Upload(dense_sums={"fedmr.proj.text.weight": w * delta}, table_items={"item": rows[0]},
                      table_sums={"item": w * rows[1]}, grad_sums={"fedmr.proj.text.weight": w * grad}, weight=w)
               for w in (137.0, 59.0)]
    new = apply_uploads(theta, uploads)
    assert torch.allclose(new["fedmr.proj.text.weight"], theta["fedmr.proj.text.weight"] + delta)
    assert torch.allclose(new["item"][rows[0]], theta["item"][rows[0]] + rows[1])
    # the averaged gradient is the clients' common gradient: one Adam step on it
    stepped, _ = apply_fusion_grads(theta, uploads, None, lr=0.05)
    param = torch.nn.Parameter(theta["fedmr.proj.text.weight"].clone())
    adam = torch.optim.Adam([param], lr=0.05)
    param.grad = grad.clone()
    adam.step()
    assert torch.allclose(stepped["fedmr.proj.text.weight"], param.detach())
    # FedAvg+FedMR uploads weigh clients by their rows: the pool's weight is its rows processed
    _, strategy, pools = started(make_config("fedavg", MOE, "train.lr=0.5"), data)
    _, uploads, _ = one_round(strategy, pools)
    assert all(u.weight == u.rows for u in uploads)


# --- FedRAP regularisers compound to zero ------------------------------------------------------------


class _Rows:
    def __init__(self, p, c):
        self.p, self.c = p, c

    def table(self, name):
        return self.p if name == "item_personal" else self.c


def test_d7_fedrap_ramp_is_a_pure_function_of_the_round():
    cfg = load_config(None, ["model.backbone=fedrap", "model.fedrap_lambda=0.3", "model.fedrap_mu=0.2",
                             "model.fusion={}"])
    model = model_for(cfg.model)
    p, c = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    ctx = _Rows(p, c)
    for round_ in (0, 1, 2, 5, 20):
        lam, mu = math.tanh(round_ / 10) * 0.3, math.tanh(round_ / 10) * 0.2
        expected = -lam * (p - c).square().mean(-1) + mu * c.abs().mean(-1)
        assert torch.allclose(model.row_regulariser(ctx, round_, cfg.model), expected)
    assert model.row_regulariser(ctx, 3, cfg.model).abs().max() > 0  # not 0 after round 0


# --- local/global split by name substrings ---------------------------------------------------------


def test_d8_local_router_is_never_uploaded_or_overwritten(data):
    cfg = make_config("fcf", MOE, "train.participation=0.5")
    init, strategy, pools = started(cfg, data)
    shards = pools.pools
    assert all(k in init.personal_shared and k not in init.global_params for k in ROUTER)
    users0, uploads, g = one_round(strategy, pools)
    for up in uploads:
        assert not set(ROUTER) & {*up.dense_sums, *up.grad_sums, *up.table_sums}
    assert not set(ROUTER) & set(g)
    kept = {u: personal_of(shards, u) for u in users0.tolist()}
    users1, _, _ = one_round(strategy, pools)
    for u in set(users0.tolist()) - set(users1.tolist()):
        assert all(torch.equal(personal_of(shards, u)[k], kept[u][k]) for k in ROUTER)
    routers = torch.stack([personal_of(shards, u)["fedmr.router.fc1.weight"] for u in users0.tolist()])
    assert (routers - routers[0]).abs().amax(dim=(1, 2))[1:].min() > 1e-8  # each user's own router
    # router_scope=global: the router is aggregated with the experts and nobody keeps a copy
    cfg = make_config("fcf", f"{MOE}, router_scope: global")
    init, strategy, pools = started(cfg, data)
    shards = pools.pools
    assert all(k in init.global_params for k in ROUTER)
    _, uploads, _ = one_round(strategy, pools)
    assert all(set(ROUTER) <= set(up.dense_sums) for up in uploads)
    assert not set(ROUTER) & set(shards[0].store.dense)


# --- attention across the items of a batch ------------------------------------------------------------


@pytest.mark.parametrize("fusion", [MOE, "d_f: 8, fusion: attention, attention_heads: 2",
                                    "d_f: 8, fusion: attention, attention_variant: fedvlr, attention_heads: 2"])
def test_d9_fusion_is_per_item_and_scores_do_not_depend_on_what_is_scored(data, fusion):
    cfg = make_config("fedrap", fusion)
    shards, g = run_engine(cfg, data, 1, n_shards=1)
    shard = shards[0]
    users = torch.as_tensor(shard.users)
    everyone = shard.scores(g, users)
    for u in (0, 7, 19):
        alone = shard.scores(g, users[u:u + 1])[0]
        assert torch.equal(alone, everyone[u]) or (alone - everyone[u]).abs().max() < 1e-12
        items = torch.tensor([5, 3, 11, 40, 41])  # any subset of candidates, in any order
        local = torch.as_tensor(shard.store.local_index(np.array([u])))
        with torch.no_grad():
            subset = shard.model.logits(EvalRows(shard, g, local, torch.zeros(len(items), dtype=torch.int64), items))
        assert (subset - everyone[u, items]).abs().max() < 1e-12


# --- LayerNorm gains initialised from N(0, 0.01) -------------------------------------------------------


def test_d10_layer_norm_starts_at_gain_one_bias_zero(data):
    for fusion in (MOE, "d_f: 8, fusion: attention, attention_heads: 2"):
        init = initial_state(make_config("fcf", fusion), data.n_users, data.n_items, feature_dims(data))
        norms = [k for k in init.global_params if ".ln." in k or k.startswith("fedmr.ln.")]
        assert len(norms) >= 6
        for name in norms:
            value = init.global_params[name]
            assert torch.equal(value, torch.ones_like(value) if name.endswith("weight") else torch.zeros_like(value))
    init = initial_state(make_config("fcf", f"{MOE}, layer_norm: off"), data.n_users, data.n_items, feature_dims(data))
    assert not any(".ln." in k or k.startswith("fedmr.ln.") for k in init.global_params)


# --- sigmoid then BCE-with-logits ----------------------------------------------------------------------


def test_d11_exactly_one_sigmoid(data):
    """The training loss is BCE on sigma(logit) of the same logits evaluation ranks by."""
    cfg = make_config("fedavg", "d_f: 8, d_r: 6, dropout: 0.0", "train.local_epochs=1", "train.batch_rows=100000",
                      "train.lr=1e-12")
    _, strategy, pools = started(cfg, data, n_shards=1)
    logits = pools.pools[0].scores(strategy.globals, torch.arange(data.n_users))
    assert logits.min() < 0 < logits.max()  # logits, not probabilities
    from pipeline.federated.engine.sampling import client_data, epoch_rows

    rows = epoch_rows(client_data(data, np.arange(data.n_users)), neg_ratio=cfg.train.neg_ratio,
                      rows_per_batch=cfg.train.rows_per_batch(), seed=cfg.train.seed, round_=0, epoch=0)
    per_row = torch.nn.functional.binary_cross_entropy(torch.sigmoid(logits[rows.client, rows.item]),
                                                       torch.as_tensor(rows.label, dtype=torch.float64),
                                                       reduction="none")
    expected = torch.zeros(data.n_users, dtype=torch.float64).index_add_(0, torch.as_tensor(rows.client), per_row)
    expected = (expected / torch.as_tensor(np.bincount(rows.client))).mean()
    _, uploads, _ = one_round(strategy, pools)
    assert uploads[0].loss_sum / uploads[0].clients == pytest.approx(expected.item(), rel=1e-9)


# --- FedNCF full ranking scores every user with user row 0 -------------------------------------------


def test_d12_fedncf_scores_each_user_with_their_own_vectors(data):
    cfg = make_config("fedncf", MOE, "train.lr=0.1")
    shards, g = run_engine(cfg, data, 2, n_shards=2)
    oracle = run_oracle(cfg, data, 2)
    for shard in shards:
        users = torch.as_tensor(shard.users)
        batch = shard.scores(g, users)
        assert (batch - oracle_scores_fedmr(cfg, data, oracle, users.tolist())).abs().max() < 1e-8
        for row in (0, 3, len(users) - 1):
            assert (shard.scores(g, users[row:row + 1])[0] - batch[row]).abs().max() < 1e-12
        assert (batch[1:] - batch[:1]).abs().amax(1).min() > 1e-6  # not user row 0 for everyone


# --- FedNCF averages the whole user tables ----------------------------------------------------------


def test_d13_fedncf_user_vectors_stay_local(data):
    cfg = make_config("fedncf", MOE, "train.lr=0.1", "train.participation=0.5")
    init, strategy, pools = started(cfg, data)
    shards = pools.pools
    assert not {"user_mf", "user_mlp"} & set(strategy.globals)
    users0, uploads, g = one_round(strategy, pools)
    assert all(not {"user_mf", "user_mlp"} & {*u.dense_sums, *u.table_sums} for u in uploads)
    for u in range(data.n_users):
        mine = personal_of(shards, u)
        moved = changed(mine["user_mf"], init.personal_per_user["user_mf"][u])
        assert (moved > 1e-8) == (u in users0.tolist())  # only its own training moves it: no 1/N dilution


# --- config keys that do nothing ------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, key", [
    (["model.fusion={fusion: sum, router_scope: global}"], "router_scope"),
    (["model.fusion={fusion: mlp, mixing_source: batch}"], "mixing_source"),
    (["model.fusion={fusion: gate, mixing_softmax: double}"], "mixing_softmax"),
    (["model.fusion={fusion: sum, d_r: 32}"], "d_r"),
    (["model.fusion={fusion: sum, dropout: 0.3}"], "dropout"),
    (["model.fusion={attention_variant: fedvlr}"], "attention_variant"),
    (["model.fusion={server_clip: 1.0}"], "server_clip"),
    (["model.fusion={server_lr: 0.1}"], "server_lr"),
    (["model.fusion={d_id: 128}"], "d_id"),
    (["model.backbone=fedncf", "model.fusion={d_f: 32}"], "d_f"),
    (["model.fusion={modalities: []}"], "modalities"),
    (["model.fusion={modalities: [text, text]}"], "modalities"),
    (["model.fusion={fusion: attention, d_f: 10}"], "attention_heads"),
    (["model.fusion={fusion: moex}"], "fusion"),
    (["model.fusion={routr_scope: local}"], "routr_scope"),
    (["model.fusion={dropout: 1.5}"], "dropout"),
])
def test_d14_options_that_would_do_nothing_are_refused(overrides, key):
    with pytest.raises(ValueError, match=key):
        load_config(None, overrides)


BASE = "d_f: 8, d_r: 6"
EFFECTS = {  # option -> (baseline fusion options, changed fusion options, extra)
    "fusion=sum": (BASE, "d_f: 8, fusion: sum", ()),
    "fusion=mlp": (BASE, "d_f: 8, fusion: mlp", ()),
    "fusion=gate": (BASE, "d_f: 8, fusion: gate", ()),
    "fusion=attention": (BASE, "d_f: 8, fusion: attention, attention_heads: 2", ()),
    "attention_variant": ("d_f: 8, fusion: attention, attention_heads: 2",
                          "d_f: 8, fusion: attention, attention_heads: 2, attention_variant: fedvlr", ()),
    "attention_heads": ("d_f: 8, fusion: attention, attention_heads: 2", "d_f: 8, fusion: attention", ()),
    "router_scope": (BASE, f"{BASE}, router_scope: global", ("train.participation=0.5",)),
    "fusion_agg": (BASE, f"{BASE}, fusion_agg: grad_adam", ()),
    "server_lr": (f"{BASE}, fusion_agg: grad_adam", f"{BASE}, fusion_agg: grad_adam, server_lr: 0.001", ()),
    "server_clip": (f"{BASE}, fusion_agg: grad_adam", f"{BASE}, fusion_agg: grad_adam, server_clip: 0.001", ()),
    "mixing_source": (BASE, f"{BASE}, mixing_source: batch", ()),
    "mixing_softmax": (BASE, f"{BASE}, mixing_softmax: double", ()),
    "layer_norm": (BASE, f"{BASE}, layer_norm: off", ()),
    "dropout": (BASE, f"{BASE}, dropout: 0.5", ()),
    "d_f": (BASE, "d_f: 6, d_r: 6", ()),
    "d_r": (BASE, "d_f: 8, d_r: 5", ()),
    "modalities": (BASE, f"{BASE}, modalities: [id, image]", ()),
    "d_id (FedNCF)": (BASE, f"{BASE}, d_id: 6", ("model.backbone=fedncf", "train.lr=0.1")),
}


@pytest.mark.parametrize("option", list(EFFECTS))
def test_d14_every_fusion_option_takes_effect(data, option):
    base, other, extra = EFFECTS[option]
    results = []
    for fusion in (base, other):
        backbone = "fcf"
        cfg = make_config(backbone, fusion, *extra)
        shards, g = run_engine(cfg, data, 2, n_shards=1)
        results.append(engine_scores(shards, g, data.n_users, data.n_items))
    assert (results[0] - results[1]).abs().max() > 1e-6


# --- hyper-parameters selected on test --------------------------------------------------------------


def test_d15_selection_uses_validation_only(data):
    """The best round is the best validation round; the reported test metrics are that round's,
    even where another round has a better test score."""
    cfg = make_config("fcf", MOE, "train.lr=0.5", "train.selection_metric=hr@10", "train.patience=10",
                      "train.protocol=p3", "train.eval_ks=[10, 20]")
    _, strategy, pools = started(cfg, data, n_shards=1)
    history = run_rounds(strategy, pools, rounds=6)
    selection = strategy.selection
    valid = [m["valid/hr@10"] for m in history]
    best = int(np.argmax(valid))
    assert selection.best_round == best
    assert selection.best_test == {k[5:]: v for k, v in history[best].items() if k.startswith("test/")}
    # a round with a better test score but a worse validation score never wins
    tricky = Selection("hr@10", patience=10)
    tricky.update(0, {"valid/hr@10": 0.5, "test/hr@10": 0.1})
    tricky.update(1, {"valid/hr@10": 0.4, "test/hr@10": 0.9})
    assert tricky.best_round == 0 and tricky.best_test == {"hr@10": 0.1}
