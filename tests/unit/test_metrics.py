"""Ranks, HR and NDCG against hand-computed cases; P1 and P3 evaluators on tiny data."""

import math

import numpy as np
import pytest
import torch

from pipeline.data.negatives import EvalNegatives
from pipeline.data.prepare import PrepareConfig, prepare
from pipeline.data.schema import Interactions, RawDataset
from pipeline.eval.metrics import hit_ndcg, rank_in_full_scores, rank_of_target
from pipeline.eval.protocols import evaluate_full, evaluate_sampled


def test_rank_counts_ties_against_the_target():
    scores = torch.tensor([[0.1, 0.5, 0.5, 0.9]])
    assert rank_in_full_scores(scores, torch.tensor([1])).item() == 3  # 0.9 and the tied 0.5
    assert rank_in_full_scores(scores, torch.tensor([3])).item() == 1
    assert rank_in_full_scores(scores, torch.tensor([0])).item() == 4
    constant = torch.zeros(2, 200)
    assert (rank_in_full_scores(constant, torch.tensor([0, 5])) == 200).all()


def test_hr_ndcg_hand_computed():
    ranks = torch.tensor([1, 2, 10, 11, 50, 51])
    m = hit_ndcg(ranks, ks=(10, 50))
    assert m["hr@10"].tolist() == [1, 1, 1, 0, 0, 0]
    assert m["hr@50"].tolist() == [1, 1, 1, 1, 1, 0]
    expected = [1.0, 1 / math.log2(3), 1 / math.log2(11), 0, 0, 0]
    np.testing.assert_allclose(m["ndcg@10"].numpy(), expected)
    assert m["ndcg@50"][4].item() == pytest.approx(1 / math.log2(51))


def test_nan_scores_are_an_error():
    with pytest.raises(ValueError, match="NaN"):
        rank_of_target(torch.tensor([[float("nan"), 1.0]]), torch.tensor([0.5]))


def tiny():
    # user 0: train items 0,1 then valid 2, test 3; user 1: train 4 then valid 0, test 1
    raw = RawDataset("tiny", Interactions(np.array([0, 0, 0, 0, 1, 1, 1]), np.array([0, 1, 2, 3, 4, 0, 1]),
                                          np.array([1, 2, 3, 4, 1, 2, 3])))
    return prepare(raw, PrepareConfig(min_user=0, min_item=0))


def test_full_ranking_masks_training_items_only():
    data = tiny()
    item_scores = torch.tensor([5.0, 4.0, 1.0, 3.0, 2.0])  # same for both users

    def scorer(users):
        return item_scores.expand(len(users), -1)

    test = evaluate_full(scorer, data, "test", ks=(1, 2))
    # user 0: items 0,1 masked; candidates 2(1.0) 3(3.0) 4(2.0) -> test item 3 rank 1
    # user 1: item 4 masked; candidates 0(5) 1(4) 2(1) 3(3) -> test item 1 rank 2
    assert test["hr@1"] == 0.5 and test["hr@2"] == 1.0
    assert test["ndcg@2"] == pytest.approx((1 + 1 / math.log2(3)) / 2)
    valid = evaluate_full(scorer, data, "valid", ks=(1,))
    # user 0: valid 2 (1.0) below 3 and 4 -> rank 3; user 1: valid 0 rank 1
    assert valid["hr@1"] == 0.5
    masked = evaluate_full(scorer, data, "valid", ks=(2,), mask_heldout_other=True)
    # user 0 without its test item 3: candidates 2(1.0), 4(2.0) -> rank 2
    assert masked["hr@2"] == 1.0


def test_sampled_ranking_ignores_padding_and_checks_fingerprint():
    data = tiny()
    neg = EvalNegatives(valid=np.array([[4, -1], [2, 3]], dtype=np.int32),
                        test=np.array([[4, -1], [2, -1]], dtype=np.int32),
                        n_valid=np.array([1, 2]), n_test=np.array([1, 1]), seed=0,
                        fingerprint=data.fingerprint())

    def scorer(users):
        return torch.tensor([5.0, 4.0, 1.0, 3.0, 2.0]).expand(len(users), -1)

    out = evaluate_sampled(scorer, data, neg, "test", ks=(1,))
    assert out["hr@1"] == 1.0  # user 0: 3.0 vs 2.0; user 1: 4.0 vs 1.0
    out = evaluate_sampled(scorer, data, neg, "valid", ks=(1, 2))
    # user 0: valid item 2 (1.0) vs item 4 (2.0) -> rank 2; user 1: item 0 (5) vs 1,3 -> rank 1
    assert out["hr@1"] == 0.5 and out["hr@2"] == 1.0
    stale = EvalNegatives(neg.valid, neg.test, neg.n_valid, neg.n_test, 0, "0" * 16)
    with pytest.raises(ValueError, match="re-prepare"):
        evaluate_sampled(scorer, data, stale)


def test_mrr_hand_computed():
    """MRR@K: 1 / rank of the held-out item within the top K, else 0 (ties count against it)."""
    m = hit_ndcg(torch.tensor([1, 2, 4, 10, 11]), ks=(10,))
    np.testing.assert_allclose(m["mrr@10"].numpy(), [1.0, 0.5, 0.25, 0.1, 0.0])
    assert m["mrr@10"].mean().item() == pytest.approx((1 + 0.5 + 0.25 + 0.1) / 5)
    tied = rank_in_full_scores(torch.zeros(1, 30), torch.tensor([3]))  # a constant model: last
    assert hit_ndcg(tied, ks=(10, 50))["mrr@50"].item() == pytest.approx(1 / 30)


def test_tables_show_mrr_only_where_runs_measured_it():
    from pipeline.report.tables import LEARNED, render_table

    def row(test):
        return {"label": "FCF", "source": LEARNED, "test": test, "valid": {"hr@10": [0.5]}, "best_round": [3],
                "rounds_run": [5], "seeds": [0], "seeds_planned": [0]}

    before = row({"hr@10": [0.5], "ndcg@10": [0.3], "hr@20": [0.6], "ndcg@20": [0.35], "hr@50": [0.8],
                  "ndcg@50": [0.4]})
    assert "MRR" not in render_table([before], "p1", "hr@10")  # records from before MRR was measured
    measured = row({**before["test"], "mrr@10": [0.25], "mrr@20": [0.26], "mrr@50": [0.27]})
    header = render_table([before, measured], "p1", "hr@10").splitlines()[0]
    assert header.count("MRR") == 1 and "test MRR@10" in header  # P1 tables show K = 10


def test_a_row_shows_mrr_only_when_every_seed_measured_it():
    """Seeds of one config from before and after MRR was measured: the row has no MRR (a mean
    over the newer seeds alone would pass for one over all), and its per-seed values still build."""
    from types import SimpleNamespace

    from pipeline.config import load_config
    from pipeline.report.tables import learned_row

    config = load_config(None, ["model.backbone=fcf", "train.protocol=p1"])
    old_test = {f"{m}@{k}": 0.5 for m in ("hr", "ndcg") for k in (10, 20, 50)}

    def run(seed, test):
        summary = {"selection": {"test": test, "valid": {"hr@10": 0.5}, "best_round": 3}, "rounds_run": 5}
        return SimpleNamespace(spec=SimpleNamespace(seed=seed, config=config, key="fcf", centralized=False),
                               summary=summary, status="recorded", error=None, extra={})

    runs = [run(0, old_test), run(1, {**old_test, "mrr@10": 0.3, "coverage@10": 0.9})]
    row = learned_row(runs, "p1")
    assert "mrr@10" not in row["test"] and "coverage@10" not in row["test"] and row["test"]["hr@10"] == [0.5, 0.5]
    assert set(row["per_seed"]) == {0, 1} and "test/mrr@10" not in row["per_seed"][1]
    both = learned_row([run(0, {**old_test, "mrr@10": 0.2}), run(1, {**old_test, "mrr@10": 0.3})], "p1")
    assert both["test"]["mrr@10"] == [0.2, 0.3]


def test_trivial_rows_alone_add_no_mrr_column():
    """A table rebuilt from records that predate MRR stays as it was, even though its trivial rows
    (computed afresh) have MRR."""
    from pipeline.report.tables import LEARNED, render_table

    old = {"label": "FCF", "source": LEARNED, "test": {"hr@10": [0.5], "ndcg@10": [0.3]}, "valid": {"hr@10": [0.5]},
           "best_round": [3], "rounds_run": [5], "seeds": [0], "seeds_planned": [0]}
    popularity = {"label": "popularity", "source": "trivial", "test": {"hr@10": [0.4], "ndcg@10": [0.2],
                                                                      "mrr@10": [0.1]}}
    assert "MRR" not in render_table([old, popularity], "p1", "hr@10")


def test_coverage_is_the_share_of_items_in_some_users_top_k():
    """P3 catalogue coverage@k: items in at least one user's top k (training items masked), and
    across pools the union of their items, not the mean of their coverages."""
    import numpy as np

    from pipeline.data.prepare import PrepareConfig, prepare
    from pipeline.data.schema import Interactions, RawDataset
    from pipeline.eval.protocols import evaluate_full, new_covered
    from pipeline.federated.strategy import Strategy

    # 2 users x 6 items; each has 3 interactions: 1 train, 1 valid, 1 test
    raw = RawDataset("t", Interactions(np.array([0, 0, 0, 1, 1, 1]), np.array([0, 1, 2, 3, 4, 5]),
                                       np.array([1, 2, 3, 1, 2, 3])))
    data = prepare(raw, PrepareConfig(min_user=0, min_item=0))
    table = torch.tensor([[6.0, 5, 4, 3, 2, 1], [1.0, 2, 3, 4, 5, 6]], dtype=torch.float64)
    scorer = lambda users: table[users]  # noqa: E731
    covered = new_covered(data.n_items, (1, 2))
    got = evaluate_full(scorer, data, "test", ks=(1, 2), covered=covered)
    # user 0's item 0 and user 1's item 3 are training items (masked): tops are (1, 2) and (5, 4)
    assert covered[1].nonzero().flatten().tolist() == [1, 5]
    assert covered[2].nonzero().flatten().tolist() == [1, 2, 4, 5]
    assert got["coverage@1"] == pytest.approx(2 / 6) and got["coverage@2"] == pytest.approx(4 / 6)
    one = {"hr@1": 1.0, "coverage@1": 1 / 6, "covered@1": np.array([0, 1, 0, 0, 0, 0], bool)}
    other = {"hr@1": 0.0, "coverage@1": 1 / 6, "covered@1": np.array([0, 1, 0, 0, 0, 1], bool)}
    assert Strategy.reduce([(one, 3), (other, 1)]) == {"hr@1": 0.75, "coverage@1": pytest.approx(2 / 6)}
