"""Evaluation scores as matrix products (pipeline/federated/engine/scoring.py) against the row-per-pair
reference (Shard.row_scores, one (user, item) row each through the model's logits), after a few
trained rounds: the same [B, I] scores (P3), the same scores of each user's candidates (P1) and
the same metrics through the evaluator, for every backbone x {ID, FedMR, GFMFR} and FedMR's
options (batch mixing, global router, no ID input, single experts), float64. Partial
participation leaves users who never trained and PFedRec copies of several rounds; FedRAP and
PFedRec then hold own rows wherever their users trained."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.data.negatives import sample_eval_negatives
from pipeline.eval.protocols import evaluate
from pipeline.federated.rounds import in_process, run_rounds
from pipeline.federated.engine.scoring import first_occurrence
from pipeline.models import BACKBONES
from test_equivalence import synthetic
from test_fedmr_equivalence import with_features

ATOL = 1e-9
MOE = "d_f: 8, d_r: 6, dropout: 0.2"
GFMFR = "model.gfmfr={group_num: 3, server_epochs: 2, group_emb_dim: 16, server_batch: 64}"
LR = {"fedavg": "train.lr=0.3", "fcf": "train.lr=0.01", "fedncf": "train.lr=0.1", "pfedrec": "train.lr=0.01",
      "fedrap": "train.lr=0.01"}


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """Every test of this module runs on one torch thread (conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def data():
    return with_features(synthetic(n_users=36, n_items=90))


@pytest.fixture(scope="module")
def negatives(data):
    return sample_eval_negatives(data, seed=0)


def make_config(backbone, *extra):
    return load_config(None, [f"model.backbone={backbone}", "model.dim=8", "train.local_epochs=2",
                              "train.batch_rows=24", "train.neg_ratio=2", "train.seed=3", "train.model_seed=5",
                              "train.participation=0.6", "train.rounds=3", LR[backbone], *extra])


def trained_shards(cfg, data, negatives, rounds=3, n_shards=2):
    """Shards after `rounds` rounds of the product's round loop (rounds.run_rounds) in this process."""
    strategy, pools = in_process(cfg, data, negatives, n_pools=n_shards, dtype=torch.float64)
    run_rounds(strategy, pools, rounds=rounds)
    return pools.pools, strategy.globals


def check_same(cfg, data, negatives):
    shards, g = trained_shards(cfg, data, negatives)
    batch_mixing = cfg.model.fusion is not None and cfg.model.fusion.mixing_source == "batch"
    for shard in shards:
        users = torch.as_tensor(shard.users)
        scorer = shard.scorer(g)
        new, old = scorer(users), shard.row_scores(g, users)
        assert new.shape == old.shape == (len(users), data.n_items)
        assert (new - old).abs().max().item() < ATOL
        for split in ("valid", "test"):
            # P1: the candidates only, padding repeating the target (as the evaluator asks)
            table = negatives.valid if split == "valid" else negatives.test
            target = torch.as_tensor(data.valid_item if split == "valid" else data.test_item)[users]
            neg = torch.as_tensor(table[shard.users].astype(np.int64))
            items = torch.cat([target[:, None], torch.where(neg >= 0, neg, target[:, None])], 1)
            picked = scorer.score_candidates(users, items)
            reference = shard.row_scores(g, users, shard.candidates(shard.users, split) if batch_mixing else None)
            assert (picked - reference.gather(1, items)).abs().max().item() < ATOL
            for protocol in ("p1", "p3"):
                kwargs = dict(negatives=negatives, users=shard.users, batch_users=7)
                ours = evaluate(scorer, data, protocol, split, **kwargs)
                theirs = evaluate(shard.row_scorer(g, protocol, split), data, protocol, split, **kwargs)
                assert ours == pytest.approx(theirs, abs=1e-12), (protocol, split)
    return shards


def test_padding_in_the_evaluation(data, negatives):
    """The small catalogue leaves users with fewer than 99 negatives: the padding path runs."""
    assert (negatives.test < 0).any() and (negatives.test >= 0).any()


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("method", ["id", "fedmr", "gfmfr", "fedmr+gfmfr"])
def test_products_equal_rows(data, negatives, backbone, method):
    extra = {"id": (), "fedmr": (f"model.fusion={{{MOE}}}",), "gfmfr": (GFMFR,),
             "fedmr+gfmfr": (GFMFR, f"model.fusion={{{MOE}}}")}[method]
    shards = check_same(make_config(backbone, *extra), data, negatives)
    store = shards[0].store
    if backbone == "fedrap":  # own rows of P_u overwrite the base product
        assert len(store.tables["item_personal"].keys) > 0
    if backbone == "pfedrec":  # copies from more than one round, and users who never trained
        rounds = store.copy_round.unique().tolist()
        assert -1 in rounds and len([r for r in rounds if r >= 0]) >= 2


FEDMR_OPTIONS = {
    "fcf-batch-double": ("fcf", f"{MOE}, mixing_source: batch, mixing_softmax: double"),
    "fedavg-global_router": ("fedavg", f"{MOE}, router_scope: global"),
    "fedrap-batch": ("fedrap", f"{MOE}, mixing_source: batch"),
    "pfedrec-batch": ("pfedrec", f"{MOE}, mixing_source: batch, router_scope: global"),
    "fedncf-batch": ("fedncf", f"{MOE}, mixing_source: batch"),
    "fedncf-gate": ("fedncf", "d_f: 8, fusion: gate"),
    "fedncf-text_only": ("fedncf", f"{MOE}, modalities: [text]"),
    "fedrap-no_id": ("fedrap", f"{MOE}, modalities: [text, image]"),
    "pfedrec-sum": ("pfedrec", "d_f: 8, fusion: sum"),
    "fedrap-gate": ("fedrap", "d_f: 8, fusion: gate"),
    "fcf-attention": ("fcf", "d_f: 8, fusion: attention, attention_heads: 2"),
}


@pytest.mark.parametrize("variant", list(FEDMR_OPTIONS))
def test_products_equal_rows_fedmr_options(data, negatives, variant):
    backbone, fusion = FEDMR_OPTIONS[variant]
    check_same(make_config(backbone, f"model.fusion={{{fusion}}}"), data, negatives)


@pytest.mark.parametrize("backbone", ["fedrap", "pfedrec", "fcf"])
def test_products_equal_rows_with_weight_decay(data, negatives, backbone):
    """Weight decay scales a user's whole personal table (a per-user factor on the product)."""
    shards = check_same(make_config(backbone, "train.weight_decay=0.05"), data, negatives)
    store = shards[0].store
    assert store.table_scale or store.copy_scale or backbone == "fcf"


def test_pfedrec_on_the_global_table(data, negatives):
    check_same(make_config("pfedrec", "model.pfedrec_eval_table=global"), data, negatives)
    check_same(make_config("pfedrec", "model.pfedrec_eval_table=global", f"model.fusion={{{MOE}}}"), data, negatives)


def test_first_occurrence():
    items = torch.tensor([[3, 1, 3, 3, 2], [0, 0, 0, 0, 0]])
    assert first_occurrence(items).tolist() == [[True, True, False, False, True], [True, False, False, False, False]]


def test_sub_blocks_do_not_change_scores(data, negatives, monkeypatch):
    """Blocks of one user give the same scores as one block (the memory bound is a split)."""
    import pipeline.federated.engine.scoring as scoring

    cfg = make_config("fedrap", f"model.fusion={{{MOE}}}")
    shards, g = trained_shards(cfg, data, negatives, rounds=2, n_shards=1)
    users = torch.as_tensor(shards[0].users)
    whole = shards[0].scorer(g)(users)
    items = torch.as_tensor(negatives.test[shards[0].users, :5].clip(min=0).astype(np.int64))
    candidates = shards[0].scorer(g).score_candidates(users, items)
    for name in ("ROW_BUDGET", "ROW_BUDGET_FUSION", "ELEMENT_BUDGET"):
        monkeypatch.setattr(scoring, name, 1)
    assert (shards[0].scorer(g)(users) - whole).abs().max().item() < ATOL
    assert (shards[0].scorer(g).score_candidates(users, items) - candidates).abs().max().item() < ATOL


@pytest.mark.parametrize("fusion", [None, f"{MOE}, mixing_source: batch"])
def test_rows_fallback_equals_rows(data, negatives, fusion):
    """A model with neither a linear head nor FedNCF's tower is scored as rows (candidates only
    under P1): forced here on FedNCF."""
    cfg = make_config("fedncf", *((f"model.fusion={{{fusion}}}",) if fusion else ()))
    shards, g = trained_shards(cfg, data, negatives, rounds=2, n_shards=1)
    shard, users = shards[0], torch.as_tensor(shards[0].users)
    scorer = shard.scorer(g)
    scorer.ncf = False
    assert (scorer(users) - shard.row_scores(g, users)).abs().max().item() < ATOL
    for protocol in ("p1", "p3"):
        ours = evaluate(scorer, data, protocol, "test", negatives=negatives, users=shard.users)
        theirs = evaluate(shard.row_scorer(g, protocol, "test"), data, protocol, "test", negatives=negatives,
                          users=shard.users)
        assert ours == pytest.approx(theirs, abs=1e-12)
