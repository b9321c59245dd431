"""Sweeps (tune/sweep.py): search spaces checked by name, and a sweep stopped mid-way resumed with
Tuner.restore. The best command, the trial table and the TensorBoard files of a sweep are in
tests/on_ray/test_sweep_best.py."""

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

from pipeline.config import load_config
from tune.sweep import SearchSpace

REPO = Path(__file__).resolve().parents[2]
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


def test_a_space_ranks_by_the_metric_train_selects_on(tmp_path):
    """Trials are ranked by the validation metric their training selects on: a space's `metric`
    that is another one, or points that select on different metrics, are refused by name."""
    with pytest.raises(ValueError, match=r"metric: valid/hr@10, but the trials' training selects on valid/hr@50 "
                                         r".*set train.selection_metric=hr@10 in `set:`"):
        SearchSpace.load(write_space(tmp_path, metric="valid/hr@10"))
    assert SearchSpace.load(write_space(tmp_path, metric="valid/hr@50")).selection_metric() == "valid/hr@50"
    mixed = write_space(tmp_path)
    raw = yaml.safe_load(mixed.read_text())
    raw["params"]["train.selection_metric"] = {"choice": ["hr@50", "ndcg@10"]}
    mixed.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"selects on valid/ndcg@10, the first value of every distribution on "
                                         r"valid/hr@50"):
        SearchSpace.load(mixed)


def test_the_best_config_gets_the_base_schedule_unless_asked(tmp_path):
    """best.yaml: the base config's train.rounds and runtime (not the trials' shortened schedule, pools
    and folders), the space's other fixed overrides and the point; --keep-sweep-schedule keeps the
    trials' schedule."""
    space = SearchSpace.load(write_space(tmp_path, set=[*TINY, "train.patience=1", "runtime.checkpoint_every=0"]))
    base = load_config(REPO / "configs/synthetic/fcf.yaml")
    assert space.dropped_schedule() == ["train.rounds=3", "train.patience=1", "runtime.checkpoint_every=0"]
    config = space.best_config(START, tmp_path / "fresh")
    assert (config.train.rounds, config.train.patience) == (base.train.rounds, base.train.patience) == (30, 10)
    assert config.runtime.checkpoint_every == base.runtime.checkpoint_every != 0
    assert Path(config.runtime.out) == tmp_path / "fresh" and config.runtime.pools is None
    assert (config.train.lr, config.model.dim, config.train.local_epochs) == (0.3, 16, 1)  # point and `set:` kept
    assert config.data.synthetic["n_users"] == 40
    kept = space.best_config(START, tmp_path / "fresh", keep_schedule=True)
    assert (kept.train.rounds, kept.train.patience, kept.runtime.checkpoint_every) == (3, 1, 0)


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


def test_trial_table_ranks_by_trains_selection(tmp_path):
    """tune.trials, from trial folders alone: a trial's selected round is the first with the highest
    validation metric (strictly better, as `pipeline train` selects; under a sampled evaluation the
    score is that round on every user), trials ranked by the metric there; a failed trial is listed
    last without a rank, however high it peaked; status from the folder (its schedule ran out, its
    patience, ASHA, an error)."""
    from tune.trials import render, render_csv, trial_rows

    def trial(number, params, values, *, stop=True, rounds=None, done=False, error=None, full=None):
        folder = tmp_path / f"_trial_{number:08x}_{number}_lr={params['train.lr']}"
        (folder / "run").mkdir(parents=True)
        (folder / "params.json").write_text(json.dumps(params))
        (folder / "run" / "config.yaml").write_text(yaml.safe_dump({"train": {"rounds": rounds or len(values)}}))
        rows = [{"round": r, "train/loss": 0.5, "valid/hr@10": v, "test/hr@10": v / 2,
                 "stop": stop and r == len(values) - 1, **(full or {}).get(r, {})} for r, v in enumerate(values)]
        (folder / "run" / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        (folder / "result.json").write_text(json.dumps({"round": len(values) - 1, "done": done}) + "\n")
        if error:
            (folder / "error.txt").write_text(f"Traceback (most recent call last):\n  ...\n{error}\n")

    trial(1, {"train.lr": 0.1}, [0.2, 0.5, 0.5, 0.4])                       # ran its 4 rounds
    trial(2, {"train.lr": 1.0}, [0.3, 0.6], stop=False, done=True, rounds=4)  # ASHA stopped it
    trial(3, {"train.lr": 3.0}, [0.9, 0.2], stop=False,                     # peaked, diverged, failed
          error="FloatingPointError: round 2: the training loss of 3 client(s) is not finite")
    trial(4, {"train.lr": 0.5}, [0.1, 0.4, 0.3], rounds=10,                 # its patience ended it
          full={1: {"full/valid/hr@10": 0.35, "full/test/hr@10": 0.3, "full/users": 40, "eval/users": 10}})
    rows = trial_rows(tmp_path, "valid/hr@10")
    assert [(r["rank"], r["params"]["train.lr"], r["status"], r["best_round"], r["valid"], r["rounds"])
            for r in rows] == [
        (1, 1.0, "TERMINATED (stopped early by ASHA)", 1, 0.6, 2),
        (2, 0.1, "TERMINATED", 1, 0.5, 4),
        (3, 0.5, "TERMINATED (early stop: patience)", 1, 0.35, 3),  # sampled: every user's number at round 1
        (None, 3.0, "ERROR", 0, 0.9, 2)]
    assert rows[2]["test"] == 0.3 and rows[1]["test"] == 0.25 and rows[1]["last_valid"] == 0.4
    assert rows[3]["error"].startswith("FloatingPointError: round 2")
    table = render(rows, "valid/hr@10", "t", "cmd", starts=[{"train.lr": 0.1}], notes=["Why it ended."])
    assert "| 1 | 1 | TERMINATED (stopped early by ASHA) | 2 | 1 | 60.00 | 30.00 | 60.00 |" in table
    assert "| 2 (*start*) | 0.1 | TERMINATED | 4 | 1 | 50.00 | 25.00 | 40.00 |" in table
    assert "| — | 3 | ERROR: FloatingPointError | 2 | 0 | 90.00 | 45.00 | 20.00 |" in table
    assert table.endswith("\n\nWhy it ended.")
    lines = render_csv(rows, "valid/hr@10").splitlines()
    assert lines[0] == "rank,trial,train.lr,status,rounds,best_round,valid/hr@10,test/hr@10,last_valid/hr@10," \
                       "last_loss,error"
    assert lines[4].startswith(",_trial_00000003_3_lr=3.0,3.0,ERROR,2,0,0.9,0.45,0.2,0.5,FloatingPointError")
