"""Sweeps (tune/sweep.py): Ray Tune + Optuna + ASHA over a tiny dataset, TensorBoard files of every
trial read back with TensorBoard's reader, the exported best config re-run to the same numbers,
and a sweep stopped mid-way resumed with Tuner.restore."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tune.sweep import SearchSpace

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.synthetic={n_users: 40, n_items: 30, images: false, seed: 1}", "train.rounds=3",
        "train.local_epochs=1"]


START = {"train.lr": 0.3, "model.dim": 16}  # a known recipe the search tries first


def write_space(tmp_path: Path, **more) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"base": "configs/synthetic/fcf.yaml", "set": TINY, "pools": 1, "params": {
        "train.lr": {"loguniform": [0.05, 0.5]}, "model.dim": {"choice": [8, 16]}}, **more}))
    return path


def sweep(*args, timeout=900, wait=True):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "pipeline", "sweep", *args]
    if not wait:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def valid_hr(run_dir: Path) -> list[float]:
    return [json.loads(line)["valid/hr@50"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_search_spaces_load(path):
    space = SearchSpace.load(path)  # every key builds a valid config
    assert space.params and (REPO / space.base).is_file()


def test_space_keys_are_checked_by_name(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": "configs/synthetic/fcf.yaml", "params": {"train.lrr": {"choice": [1]}}}))
    with pytest.raises(Exception, match="lrr"):
        SearchSpace.load(bad)
    bad.write_text(yaml.safe_dump({"base": "configs/synthetic/fcf.yaml", "params": {"train.lr": {"normal": [0, 1]}}}))
    with pytest.raises(ValueError, match="train.lr"):
        SearchSpace.load(bad)
    bad.write_text(yaml.safe_dump({"base": "configs/synthetic/fcf.yaml", "params": {"model.dim": {"choice": [8, -1]}}}))
    with pytest.raises(Exception, match="dim"):  # a later choice that makes no valid config
        SearchSpace.load(bad)
    with pytest.raises(ValueError, match="start point 1 must give a value for every key"):
        SearchSpace.load(write_space(tmp_path, start=[{"train.lr": 0.1}]))
    with pytest.raises(Exception, match="dim"):  # a start point that makes no valid config
        SearchSpace.load(write_space(tmp_path, start=[{"train.lr": 0.1, "model.dim": -1}]))


def test_sweep_tensorboard_and_best_config(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    space = write_space(tmp_path, start=[START])
    done = sweep("--space", str(space), "--samples", "3", "--concurrency", "1", "--storage", str(tmp_path / "s"),
                 "--name", "tiny", "--seed", "3", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(summary["trials"]) == 3 and not any(t["error"] for t in summary["trials"])
    points = [json.loads((Path(t["trial"]) / "params.json").read_text()) for t in summary["trials"]]
    assert START in points and sum(p == START for p in points) == 1  # the start point, then the search
    for trial in summary["trials"]:  # every trial's TensorBoard events, under the storage path
        run = Path(trial["trial"]) / "run"
        assert str(run).startswith(str(tmp_path / "s" / "tiny"))
        events = EventAccumulator(str(run / "tb"))
        events.Reload()
        hr = [e.value for e in events.Scalars("valid/hr@50")]
        assert hr == pytest.approx(valid_hr(run)) and len(hr) == trial["rounds"] >= 1
    best = Path(summary["best_config"])
    point = summary["best_point"]
    config = yaml.safe_load(best.read_text())
    assert config["train"]["lr"] == pytest.approx(point["train.lr"]) and config["model"]["dim"] == point["model.dim"]
    best_trial = max(summary["trials"], key=lambda t: max(valid_hr(Path(t["trial"]) / "run")))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    again = subprocess.run([sys.executable, "-m", "pipeline", "train", "--config", str(best), "--out",
                            str(tmp_path / "rerun"), "--json"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    trial_hr, rerun_hr = valid_hr(Path(best_trial["trial"]) / "run"), valid_hr(tmp_path / "rerun")
    assert rerun_hr[:len(trial_hr)] == trial_hr  # the same seed gives the same validation HR


def test_a_stopped_sweep_resumes(tmp_path):
    space = write_space(tmp_path)
    storage = tmp_path / "s"
    first = sweep("--space", str(space), "--samples", "3", "--concurrency", "1", "--storage", str(storage),
                  "--name", "cut", "--seed", "4", wait=False)
    deadline = time.time() + 600
    while not list((storage / "cut").glob("*/run/summary.json")):  # one trial finished
        assert first.poll() is None and time.time() < deadline, first.communicate()[1][-3000:] if first.poll() else ""
        time.sleep(1)
    os.killpg(first.pid, signal.SIGINT)  # like Ctrl-C
    first.wait(timeout=120)
    finished = {p.parent.parent.name: p.stat().st_mtime for p in (storage / "cut").glob("*/run/summary.json")}
    assert len(finished) < 3
    resumed = sweep("--space", str(space), "--samples", "3", "--concurrency", "1", "--storage", str(storage),
                    "--name", "cut", "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trials = json.loads(resumed.stdout.strip().splitlines()[-1])["trials"]
    assert len(trials) == 3 and not any(t["error"] for t in trials)
    done = {p.parent.parent.name: p.stat().st_mtime for p in (storage / "cut").glob("*/run/summary.json")}
    assert len(done) == 3
    assert all(done[name] == mtime for name, mtime in finished.items())  # finished trials were not re-run


def test_trial_table_ranks_by_best_validation_round(tmp_path):
    """tune.trials: a trial's best round is the first with the highest validation metric (as
    `pipeline train` selects), trials ranked by it, rounds run counted (ASHA stops)."""
    from tune.trials import render, trial_rows

    def trial(name, params, values):
        folder = tmp_path / name
        (folder / "run").mkdir(parents=True)
        (folder / "params.json").write_text(json.dumps(params))
        (folder / "run" / "metrics.jsonl").write_text(
            "".join(json.dumps({"round": r, "valid/hr@10": v}) + "\n" for r, v in enumerate(values)))

    trial("_trial_a_1", {"train.lr": 0.1}, [0.2, 0.5, 0.5, 0.4])
    trial("_trial_b_2", {"train.lr": 1.0}, [0.3, 0.6])
    (tmp_path / "_trial_c_3").mkdir()
    (tmp_path / "_trial_c_3" / "params.json").write_text(json.dumps({"train.lr": 3.0}))  # never reported
    rows = trial_rows(tmp_path, "valid/hr@10")
    assert [(r["params"]["train.lr"], r["best_round"], r["value"], r["rounds"]) for r in rows] == [
        (1.0, 1, 0.6, 2), (0.1, 1, 0.5, 4), (3.0, None, None, 0)]
    table = render(rows, "valid/hr@10", "t", "cmd", 4)
    assert "| 1 | 1 | 2 | 1 | 60.00 |" in table and "| 2 | 0.1 | 4 | 1 | 50.00 |" in table
    assert "| 3 | 3 | 0 | — | — |" in table
    marked = render(rows, "valid/hr@10", "t", "cmd", 4, starts=[{"train.lr": 0.1}], notes=["Why it ended."])
    assert "| 2 (*start*) | 0.1 | 4 | 1 | 50.00 |" in marked and "| 1 | 1 | 2 | 1 | 60.00 |" in marked
    assert marked.endswith("\n\nWhy it ended.")
