"""Evaluation schedules (train.eval_every, eval_round0, eval_users, eval_seed): the config checks,
which rounds are evaluated and on which users, selection on a sample with the selected round and
the last round evaluated again on every user; a small run on real Ray checked against the same
run driven in this process."""

import json

import numpy as np
import pytest

from pipeline.config import ConfigError, load_config
from pipeline.federated.strategy.schedule import eval_sample, eval_user_count, evaluates
from pipeline.federated.strategy.selection import Selection

SYNTH = "data.synthetic={n_users: 60, n_items: 50, images: false, seed: 3}"


def _train(*overrides):
    return load_config(None, list(overrides)).train


# -------------------------------------------------------------------------------- config


def test_defaults_evaluate_every_user_after_every_round_from_round_0():
    train = _train()
    assert (train.eval_every, train.eval_round0, train.eval_users) == (1, True, None)
    assert [r for r in range(4) if evaluates(train, r)] == [0, 1, 2, 3]
    assert eval_sample(train, 60) is None and eval_user_count(train, 60) is None


@pytest.mark.parametrize("value, message", [
    ("0", "train.eval_users=0: expected a count >= 1, a fraction in (0, 1], or null for every user"),
    ("-3", "train.eval_users=-3: expected a count >= 1"),
    ("1.5", "train.eval_users=1.5: a fraction must be in (0, 1]"),
    ("0.0", "train.eval_users=0.0: a fraction must be in (0, 1]"),
    ("true", "train.eval_users: expected a number, got the boolean true"),
    ("abc", "train.eval_users: expected a count >= 1, a fraction in (0, 1], or null for every user (got 'abc')"),
    ("[3]", "train.eval_users: expected a count >= 1, a fraction in (0, 1], or null for every user (got [3])"),
])
def test_bad_eval_users_are_refused_naming_the_key(value, message):
    with pytest.raises(ConfigError) as error:
        _train(f"train.eval_users={value}")
    assert message in str(error.value)


def test_eval_round0_must_be_a_boolean():
    with pytest.raises(ConfigError, match="train.eval_round0"):
        _train("train.eval_round0=maybe")


def test_schedule_every_k_rounds_round_0_optional():
    train = _train("train.eval_every=3", "train.eval_round0=false")
    assert [r for r in range(10) if evaluates(train, r)] == [3, 6, 9]
    train = _train("train.eval_every=3")
    assert [r for r in range(10) if evaluates(train, r)] == [0, 3, 6, 9]


def test_the_sample_is_fixed_by_eval_seed_alone():
    count = _train("train.eval_users=20")
    sample = eval_sample(count, 60)
    assert len(sample) == 20 and len(set(sample)) == 20 and np.all(np.diff(sample) > 0)
    assert sample.min() >= 0 and sample.max() < 60
    assert np.array_equal(sample, eval_sample(_train("train.eval_users=20", "train.seed=7"), 60))  # not train.seed
    assert not np.array_equal(sample, eval_sample(_train("train.eval_users=20", "train.eval_seed=1"), 60))
    fraction = _train("train.eval_users=0.25")
    assert isinstance(fraction.eval_users, float) and len(eval_sample(fraction, 60)) == 15
    assert eval_sample(_train("train.eval_users=1.0"), 60) is None  # a fraction of 1: every user, no sample
    assert eval_sample(_train("train.eval_users=60"), 60) is None
    assert len(eval_sample(_train("train.eval_users=1"), 60)) == 1  # the integer 1 is one user


def test_a_count_above_the_users_is_refused():
    with pytest.raises(ValueError, match=r"train.eval_users=100 exceeds the dataset's 60 users"):
        eval_user_count(_train("train.eval_users=100"), 60)


def test_the_count_is_checked_before_ray_starts(tmp_path):
    from pipeline.federated.runtime.run import open_checked

    config = load_config(None, [SYNTH, "train.eval_users=61", f"runtime.out={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match=r"train.eval_users=61 exceeds the dataset's 60 users"):
        open_checked(config, tmp_path / "data")


# -------------------------------------------------------------------------------- selection


def test_selection_on_a_sample_reports_every_user_at_the_selected_round():
    selection = Selection("hr@10", patience=5)
    sampled = {"valid/hr@10": 0.5, "test/hr@10": 0.4, "eval/users": 20}
    full = {"valid/hr@10": 0.3, "test/hr@10": 0.2}
    assert selection.improves(sampled)
    assert selection.update(2, sampled, full)
    assert not selection.improves({"valid/hr@10": 0.5})  # strictly better only
    assert not selection.update(4, {"valid/hr@10": 0.45, "test/hr@10": 0.9, "eval/users": 20})
    assert selection.report() == {"metric": "valid/hr@10", "best_round": 2, "valid": {"hr@10": 0.3},
                                  "test": {"hr@10": 0.2}, "selected_on": {"users": 20, "valid": {"hr@10": 0.5}}}
    unsampled = Selection("hr@10", patience=5)
    unsampled.update(0, {"valid/hr@10": 0.1, "test/hr@10": 0.2})
    assert "selected_on" not in unsampled.report()  # every user: the report as before
    old = unsampled.state_dict()
    del old["best_sampled"]  # a checkpoint written before sampled evaluation existed
    restored = Selection("hr@10", patience=5)
    restored.load_state_dict(old)
    assert restored.report() == unsampled.report()


# -------------------------------------------------------------------------------- on Ray


def _reference(config, rounds):
    """The same run in this process (rounds.run_rounds on in-process pools), evaluated after every
    round on every user and on the sample: two runs that train alike (evaluation changes no
    state), their valid/ and test/ metrics per round."""
    from pipeline.data.datasets import open_dataset
    from pipeline.federated.rounds import in_process, run_rounds

    data, negatives = open_dataset(config.data)
    out = []
    for users in (None, config.train.eval_users):
        every = config.model_copy(update={"train": config.train.model_copy(
            update={"eval_every": 1, "eval_round0": True, "eval_users": users})})
        strategy, pools = in_process(every, data, negatives, n_pools=config.runtime.pools)
        out.append([{k: v for k, v in m.items() if k.startswith(("valid/", "test/"))}
                    for m in run_rounds(strategy, pools, rounds=rounds)])
    return tuple(out)


@pytest.mark.slow
def test_sampled_schedule_on_ray(local_ray, tmp_path):
    from pipeline.federated.runtime.run import train

    overrides = [SYNTH, "model.backbone=fcf", "train.rounds=5", "train.local_epochs=2", "train.batch_rows=16",
                 "train.neg_ratio=2", "train.participation=0.7", "train.patience=50", "train.eval_every=2",
                 "train.eval_round0=false", "train.eval_users=20", "runtime.pools=2", "runtime.progress=false",
                 "runtime.tensorboard=false"]
    summaries, rows = [], []
    for name in ("first", "second"):
        config = load_config(None, [*overrides, f"runtime.out={tmp_path / name}"])
        summaries.append(train(config, data_cache=tmp_path / "data", quiet=True))
        rows.append([json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()])
        assert json.loads((tmp_path / name / "summary.json").read_text())["selection"] == summaries[-1]["selection"]
    summary, history = summaries[0], rows[0]
    metric = "hr@50"
    assert [r["round"] for r in history] == [0, 1, 2, 3, 4]
    assert [r["round"] for r in history if f"valid/{metric}" in r] == [2, 4]  # every 2 rounds, round 0 skipped
    for row in history:
        evaluated = f"valid/{metric}" in row
        assert ("eval/users" in row) == evaluated
        if evaluated:
            assert row["eval/users"] == 20 and row["eval/sampled"] is True
    assert history[2]["improved"] and "full/users" in history[2]  # the first evaluation improves: all users too
    assert history[4]["full/users"] == 60  # the last round: every user
    assert all("full/users" not in history[r] for r in (0, 1, 3))

    full, sampled = _reference(load_config(None, [*overrides, f"runtime.out={tmp_path / 'ref'}"]), 5)
    for r in (2, 4):  # the rows: the sample's metrics; full/: every user's
        for key, value in sampled[r].items():
            assert history[r][key] == pytest.approx(value, abs=1e-9), (r, key)
        for key, value in full[r].items():
            assert history[r][f"full/{key}"] == pytest.approx(value, abs=1e-9), (r, key)
    assert sampled[2] != full[2]  # the sample is not every user

    selection = summary["selection"]
    best = selection["best_round"]
    assert best in (2, 4) and best == max((2, 4), key=lambda r: (sampled[r][f"valid/{metric}"], -r))
    assert selection["test"] == pytest.approx({k[5:]: v for k, v in full[best].items() if k.startswith("test/")},
                                              abs=1e-9)
    assert selection["valid"] == pytest.approx({k[6:]: v for k, v in full[best].items() if k.startswith("valid/")},
                                               abs=1e-9)
    assert selection["selected_on"]["users"] == 20
    assert selection["selected_on"]["valid"][metric] == pytest.approx(sampled[best][f"valid/{metric}"], abs=1e-9)
    evaluation = summary["evaluation"]
    assert {k: evaluation[k] for k in ("every", "round0", "users", "sampled", "seed")} == \
        {"every": 2, "round0": False, "users": 20, "sampled": True, "seed": 0}
    assert evaluation["final"]["round"] == 4 and evaluation["final"]["users"] == 60
    assert evaluation["final"]["test"] == pytest.approx(
        {k[5:]: v for k, v in full[4].items() if k.startswith("test/")}, abs=1e-9)

    # deterministic: the second run is the first, row for row (timings and peak memory aside)
    assert summaries[1]["selection"] == selection
    assert summaries[1]["evaluation"] == evaluation
    strip = lambda row: {k: v for k, v in row.items() if not k.startswith(("time/", "mem/"))}  # noqa: E731
    assert [strip(r) for r in rows[1]] == [strip(r) for r in history]
