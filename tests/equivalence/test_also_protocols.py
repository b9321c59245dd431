"""train.also_protocols: one run evaluated under a second protocol gives exactly what a run under
that protocol gives (evaluation changes no training state), and `experiments --shared-runs` reads
the second protocol's rows from those runs: the same tables as training every protocol apart."""

import json

import pytest

from pipeline.config import load_config
from pipeline.data.datasets import open_dataset
from pipeline.federated.rounds import in_process, run_rounds
from pipeline.federated.strategy.selection import replay

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["data.synthetic={n_users: 60, n_items: 50, images: false, seed: 3}", "train.local_epochs=2",
        "train.batch_rows=16", "train.neg_ratio=2", "train.participation=0.7", "train.rounds=6"]
TIMES = ("time/", "mem/")


def _run(*extra):
    config = load_config(None, [*TINY, *extra])
    data, negatives = open_dataset(config.data)
    strategy, pools = in_process(config, data, negatives, n_pools=2)
    return run_rounds(strategy, pools), strategy.summary()


@pytest.mark.parametrize("backbone", ["fcf", "pfedrec", "fedrap"])
@pytest.mark.parametrize("protocol, other, patience", [("p1", "p3", 50), ("p3", "p1", 50), ("p1", "p3", 1)])
def test_a_run_that_also_evaluates_another_protocol_reports_that_protocols_run_exactly(backbone, protocol, other,
                                                                                        patience):
    common = [f"model.backbone={backbone}", f"train.patience={patience}"]
    both, both_summary = _run(*common, f"train.protocol={protocol}", f"train.also_protocols=[{other}]")
    alone, _ = _run(*common, f"train.protocol={protocol}")
    twin, twin_summary = _run(*common, f"train.protocol={other}")
    # its own protocol's rounds are those of a run without the other evaluation, number for number
    own = [{k: v for k, v in m.items() if not k.startswith((*TIMES, f"{other}/"))} for m in both]
    assert own == [{k: v for k, v in m.items() if not k.startswith(TIMES)} for m in alone]
    # the other protocol's metrics, round by round, are the twin's (as far as the twin ran)
    for mine, theirs in zip(both, twin):
        assert {k[3:]: v for k, v in mine.items() if k.startswith(f"{other}/")} == \
            {k: v for k, v in theirs.items() if k.startswith(("valid/", "test/"))}
    report = both_summary["also"][other]
    assert report["selection"] == twin_summary["selection"]
    assert report["rounds_run"] == twin_summary["rounds_run"] == len(twin)
    assert report["final"] == twin_summary["evaluation"]["final"]
    assert report["complete"] is (len(both) >= len(twin))


def _row(round_, value, prefix="p3/"):
    return {"round": round_, "valid/hr@10": 0.1, f"{prefix}valid/hr@50": value, f"{prefix}test/hr@50": value / 2}


def test_replay_stops_where_the_other_run_would_and_says_when_it_cannot_know():
    history = [_row(0, 0.3), _row(1, 0.5), _row(2, 0.4), _row(3, 0.4), _row(4, 0.6)]
    stopped = replay(history, "p3", "hr@50", patience=1, rounds=10, users=7)
    assert stopped["selection"]["best_round"] == 1 and stopped["rounds_run"] == 4 and stopped["complete"]
    assert stopped["final"] == {"round": 3, "users": 7, "valid": {"hr@50": 0.4}, "test": {"hr@50": 0.2}}
    everything = replay(history, "p3", "hr@50", patience=10, rounds=5, users=7)
    assert everything["selection"]["best_round"] == 4 and everything["selection"]["test"] == {"hr@50": 0.3}
    assert everything["complete"]
    # the history ended (its own early stop) before the other run would have: unknown, so not complete
    assert not replay(history, "p3", "hr@50", patience=10, rounds=8, users=7)["complete"]
    # a round evaluated without the other protocol (a resume that added it): not complete
    gap = [{"round": 0, "valid/hr@10": 0.1}, *history[1:]]
    assert not replay(gap, "p3", "hr@50", patience=10, rounds=5, users=7)["complete"]


@pytest.mark.parametrize("extra, match", [
    (["train.protocol=p1", "train.also_protocols=[p1]"], "not train.protocol"),
    (["train.also_protocols=[p1, p1]"], "name each protocol once"),
    (["train.also_protocols=[p1]", "train.eval_users=10"], "evaluated on every user only"),
])
def test_also_protocols_that_cannot_be_reported_are_refused(extra, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [*TINY, *extra])


def _experiments(tmp_path, name, *flags):
    from pipeline.cli import main

    config = tmp_path / "tiny.yaml"
    if not config.exists():
        config.write_text("name: tiny\nmodel:\n  backbone: pfedrec\ntrain:\n  protocol: p1\n  rounds: 4\n"
                          "  local_epochs: 2\n  batch_rows: 16\n  neg_ratio: 2\n  participation: 0.7\n"
                          "data:\n  synthetic: {n_users: 60, n_items: 50, images: false, seed: 3}\n")
    out = tmp_path / f"{name}.md"
    argv = ["experiments", "--configs", str(config), "--seeds", "0", "1", "--protocol", "p1", "p3",
            "--runs-dir", str(tmp_path / name), "--set", "runtime.backend=local", "runtime.progress=false",
            "runtime.tensorboard=false", "--out", str(out), "--json", *flags]
    return main(argv), out


def _rows(capsys) -> dict:
    printed = capsys.readouterr().out
    report = json.loads(printed[printed.index("{"):])
    return {(row["key"], row["seed"]): row for row in report["runs"]}


@pytest.mark.slow
def test_experiments_with_shared_runs_give_the_tables_of_separate_runs(tmp_path, capsys):
    assert _experiments(tmp_path, "apart")[0] == 0
    apart = _rows(capsys)
    code, report = _experiments(tmp_path, "shared", "--shared-runs", "--records", str(tmp_path / "records"))
    assert code == 0
    shared = _rows(capsys)
    assert sorted(apart) == sorted(shared) == [("tiny", 0), ("tiny", 1), ("tiny-p3", 0), ("tiny-p3", 1)]
    assert [shared[k]["status"] for k in sorted(shared)] == ["ran", "ran", "derived", "derived"]
    for key in apart:
        assert shared[key]["selection"] == apart[key]["selection"], key
    assert not (tmp_path / "shared" / "tiny-p3").exists()  # no P3 run was trained
    assert "were read from runs of the same config and seed trained under another protocol" in report.read_text()
    # the table rebuilt from the records alone (no run folders): the same rows, derived again
    code, _ = _experiments(tmp_path, "gone", "--shared-runs", "--records", str(tmp_path / "records"),
                           "--report-only")
    assert code == 0
    rebuilt = _rows(capsys)
    assert [rebuilt[k]["status"] for k in sorted(rebuilt)] == ["recorded", "recorded", "derived", "derived"]
    for key in apart:
        assert rebuilt[key]["selection"] == apart[key]["selection"], key
