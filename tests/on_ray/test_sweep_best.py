"""A real sweep of two tiny trials (Ray Tune + Optuna + ASHA, synthetic data, 3 rounds each), then:
the best command it prints is run as printed and trains a fresh folder with the base config's full
schedule; the trial table written next to the sweep ranks the trials by `pipeline train`'s own
selection (read back against every trial's summary.json); the TensorBoard event files hold one
stream per trial under the pipeline's tags, none of Ray Tune's, and the HParams plugin's data."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BASE = "configs/synthetic/fcf.yaml"  # train.rounds 30, patience 10
SET = ["data.synthetic={n_users: 40, n_items: 30, images: false, seed: 1}", "train.rounds=3", "train.local_epochs=1",
       "train.selection_metric=hr@10"]  # HR@50 on 30 items is 100% for every trial: rank on HR@10
PARAMS = {"train.lr": {"loguniform": [0.05, 0.5]}, "model.dim": {"choice": [8, 16]}}
START = {"train.lr": 0.3, "model.dim": 16}


def env() -> dict:
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment.get('PATH', '')}"  # `python`
    return environment


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """A two-trial sweep (the start point, then Optuna's), run through the CLI; (its folder, its output)."""
    tmp = tmp_path_factory.mktemp("sweep")
    space = tmp / "space.yaml"
    space.write_text(yaml.safe_dump({"base": BASE, "set": SET, "pools": 1, "params": PARAMS, "start": [START]}))
    done = subprocess.run([sys.executable, "-m", "pipeline", "sweep", "--space", str(space), "--samples", "2",
                           "--concurrency", "1", "--storage", str(tmp / "s"), "--name", "tiny", "--seed", "3",
                           "--grace-rounds", "3"],  # no ASHA milestone within 3 rounds: both trials end by themselves
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "s" / "tiny", done.stdout


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def table(sweep: Path) -> list[dict]:
    with open(sweep / "trials.csv", newline="") as file:
        return list(csv.DictReader(file))


def test_the_printed_best_command_runs_as_printed(tiny_sweep):
    sweep, printed = tiny_sweep
    lines = printed.strip().splitlines()
    assert lines[-2].startswith("train it (into ")
    command = lines[-1].strip()  # the command, exactly as the sweep printed it
    run_dir = Path(lines[-2].removeprefix("train it (into ").removesuffix("):"))
    assert command == f"python -m pipeline train --config {sweep / 'best.yaml'}"
    trials = sorted(p.parent for p in sweep.glob("*/params.json"))
    assert not run_dir.exists() and run_dir.parent == sweep and run_dir not in trials  # fresh, its own
    best = yaml.safe_load((sweep / "best.yaml").read_text())
    assert Path(best["runtime"]["out"]) == run_dir and best["runtime"]["out"] != "runs/synthetic/fcf"  # not the base's
    assert best["train"]["rounds"] == 30 and best["train"]["patience"] == 10  # the base's schedule, not 3 rounds
    ranked = table(sweep)
    winner = sweep / ranked[0]["trial"]
    assert json.loads((winner / "params.json").read_text()) == {k: best[k.split(".")[0]][k.split(".")[1]]
                                                                 for k in PARAMS}
    done = subprocess.run(command, shell=True, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["config"]["train"]["rounds"] == 30 and summary["rounds_run"] > 3
    trial_hr = [row["valid/hr@10"] for row in metrics(winner / "run")]
    rerun_hr = [row["valid/hr@10"] for row in metrics(run_dir)]
    assert rerun_hr[:3] == pytest.approx(trial_hr)  # the trial's first rounds, trained again from its config
    assert f"best round {summary['selection']['best_round']} by valid/hr@10" in done.stdout


def test_the_trial_table_and_tensorboard_read_back(tiny_sweep):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import api_pb2, metadata

    sweep, printed = tiny_sweep
    rows = table(sweep)
    assert len(rows) == 2 and [row["rank"] for row in rows] == ["1", "2"]
    assert float(rows[0]["valid/hr@10"]) >= float(rows[1]["valid/hr@10"])
    shown = printed.splitlines()
    assert all(line in shown for line in (sweep / "trials.md").read_text().splitlines())  # the CLI prints the table
    for row in rows:
        trial = sweep / row["trial"]
        # the round train selected and its validation and test HR@10: the trial's own summary.json
        selection = json.loads((trial / "run" / "summary.json").read_text())["selection"]
        assert row["status"] == "TERMINATED" and row["rounds"] == "3" and row["error"] == ""
        assert int(row["best_round"]) == selection["best_round"]
        assert float(row["valid/hr@10"]) == pytest.approx(selection["valid"]["hr@10"])
        assert float(row["test/hr@10"]) == pytest.approx(selection["test"]["hr@10"])

        events = EventAccumulator(str(trial / "run" / "tb"))
        events.Reload()
        scalars = events.Tags()["scalars"]
        assert not [tag for tag in scalars if tag.startswith("ray/")]
        hr = [e.value for e in events.Scalars("valid/hr@10")]
        assert hr == pytest.approx([m["valid/hr@10"] for m in metrics(trial / "run")])
        assert [e.step for e in events.Scalars("valid/hr@10")] == [0, 1, 2]  # the pipeline's rounds
        assert events.Scalars("best/valid/hr@10")[0].value == pytest.approx(selection["valid"]["hr@10"])
        assert events.Scalars("best/round")[0].value == selection["best_round"]
        plugin = events.PluginTagToContent("hparams")
        experiment = metadata.parse_experiment_plugin_data(plugin[metadata.EXPERIMENT_TAG])
        assert sorted(h.name for h in experiment.hparam_infos) == sorted(PARAMS)
        assert "best/valid/hr@10" in [m.name.tag for m in experiment.metric_infos]
        start = metadata.parse_session_start_info_plugin_data(plugin[metadata.SESSION_START_INFO_TAG])
        params = json.loads((trial / "params.json").read_text())
        assert start.hparams["train.lr"].number_value == pytest.approx(params["train.lr"])
        assert start.hparams["model.dim"].number_value == params["model.dim"]
        end = metadata.parse_session_end_info_plugin_data(plugin[metadata.SESSION_END_INFO_TAG])
        assert end.status == api_pb2.STATUS_SUCCESS

    # one TensorBoard stream per trial: every event file under the sweep is in a trial's run/tb (or
    # in the best command's run, once run), none of Ray Tune's own
    folders = {path.parent for path in sweep.rglob("*tfevents*")}
    assert {sweep / row["trial"] / "run" / "tb" for row in rows} <= folders
    assert all(f.parent.name == "run" or f.parent.name.startswith("best_run") for f in folders), folders
