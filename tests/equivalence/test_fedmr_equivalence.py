"""FedMR on the vectorised engine (pipeline/models/fusion.py on shard.py + client.py) against
the textbook one-client-at-a-time FedMR of reference/oracle.py (nn.Module per client,
written from FedMR's equations): same global parameters (backbone and fusion module), same personal
parameters of every user (heads, routers, P_u, Q~_u, NCF user vectors) and same evaluation
scores after 3 rounds, float64, for every backbone with fusion=moe and for the other fusion
types and options: several pools, uneven clients, several mini-batches and local epochs,
partial participation, early stopping, dropout (counter-based masks shared with the oracle)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from pipeline.config import load_config
from pipeline.federated.strategy.aggregate import feature_dims
from pipeline.federated.rounds import in_process, run_rounds
from pipeline.federated.strategy import Strategy
from reference.oracle import initial_dense_state, oracle_scores_fedmr
from test_equivalence import engine_dense, engine_scores, max_diffs, moved, run_oracle, synthetic

ATOL = 1e-8


def with_features(data, seed=1, d_text=12, d_image=10):
    """Attach random L2-normalised text and image features (the module's frozen inputs)."""
    rng = np.random.default_rng(seed)

    def unit(x):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    return dataclasses.replace(data, features={"text": unit(rng.normal(size=(data.n_items, d_text))),
                                               "image": unit(rng.normal(size=(data.n_items, d_image)))})


@pytest.fixture(autouse=True)
def feature_spans(monkeypatch):
    """The frozen-feature projections as working-set spans (client.FeatureSpan) wherever the
    Gram matrix fits, whatever the cost rule would pick on these tiny features; tests that
    need the per-client weight copies set SPAN_MAX_ITEMS = 0."""
    import pipeline.federated.engine.shard as shard_module

    monkeypatch.setattr(shard_module, "SPAN_ITEMS_PER_WIDTH", math.inf)


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """Every test of this module runs on one torch thread (conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def data():
    return with_features(synthetic())


def make_config(backbone, fusion: str, *extra):
    return load_config(None, [f"model.backbone={backbone}", "model.dim=8", "train.local_epochs=3",
                              "train.batch_rows=24", "train.neg_ratio=2", "train.seed=3", "train.model_seed=5",
                              f"model.fusion={{{fusion}}}", *extra])


MOE = "d_f: 8, d_r: 6, dropout: 0.2"
# name -> (backbone, fusion options, extra overrides, early stopping expected to be mixed)
VARIANTS = {
    # every backbone with the default fusion (moe, local router, history mixing, fedavg)
    "fedavg": ("fedavg", MOE, ("train.lr=0.5", "train.tol=0.05"), True),
    "fcf": ("fcf", MOE, ("train.tol=0.2",), True),
    "fedncf": ("fedncf", MOE, ("train.lr=0.1", "train.tol=0.01"), True),
    "pfedrec-two_step": ("pfedrec", MOE, ("model.pfedrec_eta=0.5", "train.tol=0.2"), True),
    "pfedrec-joint": ("pfedrec", MOE, ("model.pfedrec_update=joint", "train.tol=0.3"), True),
    "fedrap": ("fedrap", MOE, ("model.fedrap_lambda=2.0", "model.fedrap_mu=1.0", "train.tol=0.6"), True),
    # the other fusion types
    "fcf-sum": ("fcf", "d_f: 8, fusion: sum", (), False),
    "fcf-mlp": ("fcf", "d_f: 8, dropout: 0.2, fusion: mlp", (), False),
    "fcf-gate": ("fcf", "d_f: 8, dropout: 0.2, fusion: gate", (), False),
    "fcf-attention": ("fcf", "d_f: 8, dropout: 0.2, fusion: attention, attention_heads: 2", (), False),
    "fedrap-attention-fedvlr": ("fedrap", "d_f: 8, dropout: 0.2, fusion: attention, attention_variant: fedvlr, "
                                          "attention_heads: 2", (), False),
    # options
    "fcf-global_router-grad_adam": ("fcf", f"{MOE}, router_scope: global, fusion_agg: grad_adam", (), False),
    "fedavg-grad_adam-clip": ("fedavg", f"{MOE}, fusion_agg: grad_adam, server_clip: 0.05",
                              ("train.lr=0.5", "train.participation=0.5"), False),
    "pfedrec-grad_adam": ("pfedrec", f"{MOE}, fusion_agg: grad_adam, server_lr: 0.01", (), False),
    "fcf-batch-double-no_ln": ("fcf", f"{MOE}, mixing_source: batch, mixing_softmax: double, layer_norm: off",
                               (), False),
    "fedrap-no_id": ("fedrap", f"{MOE}, modalities: [text, image]", ("train.participation=0.5",), False),
    "fedncf-no_text-d_id": ("fedncf", f"{MOE}, modalities: [id, image], d_id: 5", ("train.lr=0.1",), False),
    "fedncf-text_only": ("fedncf", f"{MOE}, modalities: [text]", ("train.lr=0.1", "train.participation=0.5"), False),
    "fedrap-no_dropout": ("fedrap", "d_f: 8, d_r: 6, dropout: 0.0", (), False),
}


# --- the two sides ---------------------------------------------------------------------------------


def run_engine(cfg, data, rounds, n_shards, dtype=torch.float64):
    """`rounds` rounds of the product's round loop (rounds.run_rounds) on in-process pools; the
    pools' shards and the global parameters."""
    strategy, pools = in_process(cfg, data, n_pools=n_shards, dtype=dtype)
    assert len(run_rounds(strategy, pools, rounds=rounds)) == rounds
    return pools.pools, strategy.globals


def check_against_oracle(data, variant, rounds=3):
    backbone, fusion, extra, mixed_stops = VARIANTS[variant]
    cfg = make_config(backbone, fusion, *extra)
    shards, g = run_engine(cfg, data, rounds, n_shards=3)
    assert set(shards[0].grams) == set(shards[0].features)  # the projections ran as spans
    logs = []
    oracle = run_oracle(cfg, data, rounds, logs)

    rpb = cfg.train.rows_per_batch()
    batches = {u: -(-(log.rows // log.epochs) // rpb) for u, log in logs[0].items()}
    assert max(batches.values()) >= 3 and min(batches.values()) == 1  # uneven clients
    if mixed_stops:
        epochs = [log.epochs for round_logs in logs for log in round_logs.values()]
        assert min(epochs) < cfg.train.local_epochs and max(epochs) == cfg.train.local_epochs

    initial = initial_dense_state(cfg, data.n_users, data.n_items, feature_dims(data))
    if backbone == "pfedrec":
        for user in oracle.personal:
            if "item" in oracle.personal[user]:
                initial.personal[user]["item"] = initial.globals["item"]
    fusion_names = [k for k in oracle.globals if k.startswith("fedmr.")]
    assert moved(initial, oracle) > 1e-2
    assert max((oracle.globals[k] - initial.globals[k]).abs().max().item() for k in fusion_names) > 1e-4

    diffs = max_diffs(engine_dense(shards, g, data.n_items), oracle)
    assert max(diffs.values()) < ATOL, {k: v for k, v in diffs.items() if v >= ATOL}
    s_engine = engine_scores(shards, g, data.n_users, data.n_items)
    s_oracle = oracle_scores_fedmr(cfg, data, oracle, list(range(data.n_users)))
    assert (s_engine - s_oracle).abs().max().item() < ATOL
    return max(diffs.values()), (s_engine - s_oracle).abs().max().item()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_engine_matches_oracle(data, variant):
    check_against_oracle(data, variant)


@pytest.mark.parametrize("variant", ["fedrap", "pfedrec-grad_adam"])
@pytest.mark.parametrize("form", ["weights", "mixed"])
def test_per_client_projection_weights_match_oracle(data, variant, form, monkeypatch):
    """The frozen-feature projections trained as per-client weight copies (above
    SPAN_MAX_ITEMS items, or working sets wide for the features), or one modality each way:
    the same numbers as on the working set (client.FeatureSpan)."""
    import pipeline.federated.engine.shard as shard_module

    if form == "weights":
        monkeypatch.setattr(shard_module, "SPAN_MAX_ITEMS", 0)
    else:  # text (12-d) as a span, image (10-d) as weight copies
        original = shard_module.Shard._spans
        monkeypatch.setattr(shard_module.Shard, "_spans", lambda self, *a: {
            k: v for k, v in original(self, *a).items() if v.modality == "text"})
    backbone, fusion, extra, _ = VARIANTS[variant]
    cfg = make_config(backbone, fusion, *extra)
    shards, g = run_engine(cfg, data, 2, n_shards=2)
    assert (not shards[0].grams) == (form == "weights")
    oracle = run_oracle(cfg, data, 2)
    diffs = max_diffs(engine_dense(shards, g, data.n_items), oracle)
    assert max(diffs.values()) < ATOL, diffs


def assert_matches_oracle(cfg, data, shards, g, rounds):
    """The engine's parameters and scores after `rounds` rounds equal the oracle's (ATOL)."""
    oracle = run_oracle(cfg, data, rounds)
    diffs = max_diffs(engine_dense(shards, g, data.n_items), oracle)
    assert max(diffs.values()) < ATOL, diffs
    s_engine = engine_scores(shards, g, data.n_users, data.n_items)
    s_oracle = oracle_scores_fedmr(cfg, data, oracle, list(range(data.n_users)))
    assert (s_engine - s_oracle).abs().max().item() < ATOL


@pytest.mark.parametrize("variant", ["fedrap", "pfedrec-grad_adam", "fcf-global_router-grad_adam"])
@pytest.mark.parametrize("spans", [True, False])
def test_blocks_of_clients_match_oracle(data, variant, spans, monkeypatch):
    """Local training in blocks of ~20 rows per epoch (runtime.block_rows, how a CPU pool
    trains), with the projections as spans or as weight copies: the oracle's numbers."""
    import pipeline.federated.engine.client as client_module
    import pipeline.federated.engine.shard as shard_module

    if not spans:
        monkeypatch.setattr(shard_module, "SPAN_MAX_ITEMS", 0)
    blocks = []
    original = client_module._train_block
    monkeypatch.setattr(client_module, "_train_block", lambda *a, **k: blocks.append(1) or original(*a, **k))
    backbone, fusion, extra, _ = VARIANTS[variant]
    cfg = make_config(backbone, fusion, "runtime.block_rows=20", *extra)
    shards, g = run_engine(cfg, data, 2, n_shards=2)
    assert len(blocks) >= 4 * 2 * 2  # several blocks per shard and round
    assert bool(shards[0].grams) == spans
    assert_matches_oracle(cfg, data, shards, g, rounds=2)


def test_batch_mixing_p1_candidates(data):
    """mixing_source=batch under P1: alpha_u from the user's 100 candidates only (engine:
    Shard.row_scores(candidates=...)), the same as the oracle scoring over those candidates."""
    cfg = make_config("fcf", f"{MOE}, mixing_source: batch")
    shards, g = run_engine(cfg, data, 2, n_shards=2)
    oracle = run_oracle(cfg, data, 2)
    rng = np.random.default_rng(0)
    candidates = torch.as_tensor(rng.random((data.n_users, data.n_items)) < 0.3)
    engine = torch.empty(data.n_users, data.n_items, dtype=torch.float64)
    for shard in shards:
        users = torch.as_tensor(shard.users)
        engine[users] = shard.row_scores(g, users, candidates[users])
    expected = oracle_scores_fedmr(cfg, data, oracle, list(range(data.n_users)), candidates)
    assert (engine - expected).abs().max().item() < ATOL
    everything = oracle_scores_fedmr(cfg, data, oracle, list(range(data.n_users)))
    assert (everything - expected).abs().max().item() > 1e-6  # the candidate set matters here
    # Shard.evaluate under P1 passes each user's 100 candidates (held-out item + negatives)
    from pipeline.data.negatives import sample_eval_negatives
    from pipeline.eval.protocols import evaluate_sampled

    negatives = sample_eval_negatives(data, seed=0)
    for shard in shards:
        shard.negatives = negatives
    for split in ("valid", "test"):
        mask = torch.cat([shards[0].candidates(np.arange(data.n_users), split)])
        reference = evaluate_sampled(lambda users: oracle_scores_fedmr(cfg, data, oracle, users.tolist(), mask[users]),
                                     data, negatives, split, ks=(5, 10))
        results = [s.evaluate(g, "p1", split, (5, 10), with_items=True) for s in shards]
        got = Strategy.reduce(results)  # means over users; coverage of the union of the shards' top-k items
        assert got == pytest.approx(reference, abs=1e-12)
        target = data.valid_item if split == "valid" else data.test_item
        assert mask[torch.arange(data.n_users), torch.as_tensor(target)].all()
        assert (mask.sum(1) == torch.as_tensor((negatives.n_valid if split == "valid" else negatives.n_test) + 1)).all()


def test_float32_engine_matches_oracle(data):
    """The engine in float32 (production dtype) against the float64 oracle."""
    cfg = make_config("fedrap", MOE, "model.fedrap_lambda=2.0", "model.fedrap_mu=1.0")
    shards, g = run_engine(cfg, data, 2, n_shards=2, dtype=torch.float32)
    oracle = run_oracle(cfg, data, 2)
    diffs = max_diffs(engine_dense(shards, g, data.n_items), oracle)
    assert max(diffs.values()) < 1e-3, diffs


@pytest.mark.parametrize("variant", ["fedrap", "fcf-global_router-grad_adam"])
def test_independent_of_number_of_shards(data, variant):
    backbone, fusion, extra, _ = VARIANTS[variant]
    cfg = make_config(backbone, fusion, "train.participation=0.5", *extra)
    one, g1 = run_engine(cfg, data, 2, n_shards=1)
    four, g4 = run_engine(cfg, data, 2, n_shards=4)
    diffs = max_diffs(engine_dense(one, g1, data.n_items), engine_dense(four, g4, data.n_items))
    assert max(diffs.values()) < 1e-10, diffs
    s1, s4 = engine_scores(one, g1, data.n_users, data.n_items), engine_scores(four, g4, data.n_users, data.n_items)
    assert (s1 - s4).abs().max().item() < 1e-10


cases = st.fixed_dictionaries({
    "seed": st.integers(0, 10_000),
    "n_users": st.integers(4, 10),
    "n_items": st.integers(12, 30),
    "backbone": st.sampled_from(["fedavg", "fcf", "fedncf", "pfedrec", "fedrap"]),
    "fusion": st.sampled_from(["moe", "sum", "mlp", "gate", "attention"]),
    "router_scope": st.sampled_from(["local", "global"]),
    "fusion_agg": st.sampled_from(["fedavg", "grad_adam"]),
    "mixing_source": st.sampled_from(["history", "batch"]),
    "dropout": st.sampled_from([0.0, 0.3]),
    "batch_rows": st.integers(2, 20),
    "participation": st.sampled_from([0.5, 1.0]),
    "shards": st.integers(1, 3),
    "spans": st.booleans(),
})


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases)
def test_engine_matches_oracle_random(case):
    data = with_features(synthetic(case["n_users"], case["n_items"], 3, case["n_items"] // 2, seed=case["seed"]),
                         seed=case["seed"], d_text=6, d_image=5)
    moe = case["fusion"] == "moe"
    options = [f"fusion: {case['fusion']}", "d_f: 4", f"fusion_agg: {case['fusion_agg']}"]
    if case["fusion"] != "sum":
        options.append(f"dropout: {case['dropout']}")
    if case["fusion"] == "attention":
        options.append("attention_heads: 2")
    if moe:
        options += ["d_r: 3", f"router_scope: {case['router_scope']}", f"mixing_source: {case['mixing_source']}"]
    cfg = load_config(None, [f"model.backbone={case['backbone']}", "model.dim=4", "train.local_epochs=2",
                             f"train.batch_rows={case['batch_rows']}", f"train.participation={case['participation']}",
                             f"train.seed={case['seed']}", f"train.model_seed={case['seed'] + 1}",
                             f"model.fusion={{{', '.join(options)}}}"])
    import pipeline.federated.engine.shard as shard_module

    before = shard_module.SPAN_MAX_ITEMS
    shard_module.SPAN_MAX_ITEMS = before if case["spans"] else 0
    try:
        shards, g = run_engine(cfg, data, 2, case["shards"])
    finally:
        shard_module.SPAN_MAX_ITEMS = before
    assert_matches_oracle(cfg, data, shards, g, rounds=2)
