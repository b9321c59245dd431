"""pipeline/report/cold_items.py: metrics split by whether the held-out item is cold."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.data.prepare import PrepareConfig, prepare
from pipeline.data.schema import Interactions, RawDataset
from pipeline.eval.baselines import cold_first_then_popularity, popularity
from pipeline.report.cold_items import cold_users, render, subset_metrics, train_and_break_down

N_COLD = 6  # users 0..5 end on an item nobody trains on


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(3)
    users, items, times = [], [], []
    for u in range(20):
        chosen = rng.choice(np.arange(3, 40), size=9, replace=False)
        users += [u] * 9
        items += chosen.tolist()
        times += list(range(9))
        if u < N_COLD:  # the last interaction (the test item) is one of items 0..2
            users.append(u)
            items.append(u % 3)
            times.append(100)
    raw = RawDataset("cold", Interactions(np.asarray(users), np.asarray(items), np.asarray(times)))
    return prepare(raw, PrepareConfig(min_user=3, min_item=0))


def test_cold_users_are_those_whose_test_item_never_trains(data):
    cold = cold_users(data, "test")
    assert cold.sum() == N_COLD
    assert (data.item_popularity()[data.test_item[cold]] == 0).all()
    assert (data.item_popularity()[data.test_item[~cold]] > 0).all()
    assert not cold_users(data, "valid").any()


def test_subsets_partition_the_users(data):
    for make in (popularity, cold_first_then_popularity):
        found = subset_metrics(make(data), data, None, "p3", "test", (10,))
        n_cold = N_COLD
        mixed = (n_cold * found["cold"]["hr@10"] + (data.n_users - n_cold) * found["warm"]["hr@10"]) / data.n_users
        assert found["all"]["hr@10"] == pytest.approx(mixed)
    cold_first = subset_metrics(cold_first_then_popularity(data), data, None, "p3", "test", (10,))
    assert cold_first["cold"]["hr@10"] == 1.0  # the 3 cold items lead every list
    assert subset_metrics(popularity(data), data, None, "p3", "test", (10,))["cold"]["hr@10"] == 0.0
    assert subset_metrics(popularity(data), data, None, "p3", "valid", (10,))["cold"] == {}  # nobody


def test_train_and_break_down_reports_the_best_round(data):
    config = load_config(None, ["data.name=synthetic", "model.backbone=fcf", "model.dim=8", "train.rounds=4",
                                "train.protocol=p3", "train.eval_ks=[10]", "train.selection_metric=hr@10",
                                "train.local_epochs=2"])
    logged = []
    found = train_and_break_down(config, data, None, log=logged.append)
    assert found["rounds_run"] == 4 and len(logged) == 4
    assert 0 <= found["best_round"] < 4
    assert f"round {found['best_round']}:" in [line for line in logged if "(best)" in line][-1]  # the last new best
    assert set(found["test"]) == {"all", "cold", "warm"} and found["valid"]["cold"] == {}
    text = render([{"label": "FCF", "runs": [found]}], data, "p3", "hr@10", "cmd")
    assert text.startswith("<!-- made by: cmd -->")
    assert f"| FCF | 1 | {found['best_round']:.1f} | {100 * found['test']['all']['hr@10']:.2f} |" in text
    two = render([{"label": "FCF", "runs": [found, {**found, "best_round": 3}]}], data, "p3", "hr@10", "cmd",
                 overrides=["model.dim=8"], notes=["why it differs"])
    assert f"| FCF | 2 | {(found['best_round'] + 3) / 2:.1f} ({found['best_round']}, 3) |" in two
    assert "Every run with: `model.dim=8`." in two and two.rstrip().endswith("**Note:** why it differs")
