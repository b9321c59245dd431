"""Long work a user can see and stop: progress within a round (clients trained, users evaluated),
Ctrl-C at any phase with the last complete checkpoint kept and a resume to the end, and
summary.json's time split and peak memory."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]

# evaluation long enough to be interrupted in (FedNCF scores its later tower layers per (user, item)
# pair: 4,000 x 3,000 pairs per split take seconds), training short (80 clients a round), no
# evaluation after round 0, so round 0's checkpoint is complete before the first evaluation starts
SLOW_EVAL = ["data.synthetic={n_users: 4000, n_items: 3000, images: false, seed: 3}", "model.backbone=fedncf",
             "train.protocol=p3", "train.rounds=3", "train.participation=0.02", "train.eval_round0=false",
             "train.patience=50", "runtime.pools=2", "runtime.tensorboard=false"]


class Captured:
    """A subprocess's stderr, read as it comes (tqdm rewrites its line with carriage returns)."""

    def __init__(self, process: subprocess.Popen):
        self.text = ""
        self._reader = threading.Thread(target=self._read, args=(process.stderr,), daemon=True)
        self._reader.start()

    def _read(self, stream) -> None:
        for chunk in iter(lambda: stream.read(1), ""):
            self.text += chunk

    def finish(self, timeout: float = 30) -> str:
        """All of it, once the process has closed its stderr."""
        self._reader.join(timeout)
        return self.text


def _train(cwd: Path, out: Path, cache: Path, *extra: str, resume: bool = False) -> subprocess.Popen:
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONPATH": str(REPO),
           "PIPELINE_DATA_CACHE": str(cache)}
    args = [sys.executable, "-m", "pipeline", "train", "--out", str(out), *(["--resume"] if resume else []),
            "--set", *SLOW_EVAL, *extra]
    # a session of its own: the signal goes to its whole process group, as Ctrl-C in a terminal does
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


@pytest.mark.slow
def test_ctrl_c_during_evaluation_keeps_the_last_checkpoint_and_a_resume_ends_the_run(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipeline.federated.runtime.checkpoints import damage

    cwd, out, cache = tmp_path / "cwd", tmp_path / "run", tmp_path / "cache"
    cwd.mkdir()
    first = _train(cwd, out, cache)
    err = Captured(first)
    deadline = time.time() + 300
    while "round 1: valid" not in err.text:  # the progress bar shows round 1's evaluation under way
        assert first.poll() is None, f"ended before its evaluation was interrupted:\n{err.text[-3000:]}"
        assert time.time() < deadline, err.text[-3000:]
        time.sleep(0.05)
    assert (out / "checkpoints" / "round-000000").is_dir()
    os.killpg(first.pid, signal.SIGINT)  # Ctrl-C
    interrupted = time.time()
    first.wait(timeout=60)
    assert time.time() - interrupted < 30  # promptly, not at the end of the evaluation or the run
    err.finish()
    assert first.returncode == 130, err.text[-3000:]
    assert "interrupted (round 1: valid" in err.text and "round-000000; `--resume` continues from it" in err.text
    assert "Traceback" not in err.text
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["round-000000"]  # no half-written folder left
    assert damage(checkpoints / "round-000000") is None
    assert not (out / "summary.json").exists()  # a summary is a finished run's
    before = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in before] == [0]

    # the resume, with progress off (nothing on stderr but what Ray itself prints) and TensorBoard on
    resumed = _train(cwd, out, cache, "runtime.progress=false", "runtime.tensorboard=true", resume=True)
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]
    assert "rounds:" not in stderr and "users" not in stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in rows] == [0, 1, 2]
    # round 0 as the checkpoint kept it (written before its own duration was known)
    assert rows[0] == {k: v for k, v in before[0].items() if k != "time/checkpoint_seconds"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_run"] == 3 and summary["selection"]["best_round"] in (1, 2)
    timing = summary["timing"]
    assert timing["rounds"] == 3 and timing["evaluated_rounds"] == 2
    assert timing["startup_s"] > 0 and timing["train_s"] > 0 and timing["eval_s"] > timing["train_s"]
    assert timing["per_eval_s"] == pytest.approx(timing["eval_s"] / 2, abs=1e-3)
    assert set(summary["peak_rss_gb"]) == {"pool-0", "pool-1", "server", "driver"}
    assert all(0 < gb < 64 for gb in summary["peak_rss_gb"].values())
    assert all(f"mem/peak_rss_gb/pool-{i}" in rows[-1] for i in range(2))
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    for name in ("time/eval_seconds", *(f"mem/peak_rss_gb/{p}" for p in ("pool-0", "pool-1", "server", "driver"))):
        assert [e.step for e in events.Scalars(name)] == [1, 2], name
    # the prepared data went to the data cache, nothing to the working directory
    assert list(cwd.iterdir()) == [] and any(cache.iterdir())


# -- units -----------------------------------------------------------------------------------------


def test_the_evaluator_reports_every_user_it_ranks():
    import torch

    from pipeline.data.datasets import DatasetConfig, open_dataset
    from pipeline.eval.protocols import evaluate, reporting_progress

    data, negatives = open_dataset(DatasetConfig(name="synthetic", synthetic={"n_users": 50, "n_items": 40,
                                                                                "images": False, "seed": 1}))
    scorer = lambda users: torch.randn(len(users), data.n_items)  # noqa: E731
    for protocol in ("p3", "p1"):
        seen = []
        with reporting_progress(seen.append):
            evaluate(scorer, data, protocol, "valid", negatives=negatives, batch_users=7)
        assert sum(seen) == data.n_users and max(seen) == 7
    seen = []
    with reporting_progress(seen.append):
        evaluate(scorer, data, "p3", "test", batch_users=8, users=np.arange(0, 50, 2))
    assert sum(seen) == 25
    evaluate(scorer, data, "p3", "test", batch_users=8)  # outside: nothing reported
    assert sum(seen) == 25


def test_progress_text_names_the_phase_and_its_unit():
    from pipeline.federated.runtime.run import progress_text

    assert progress_text({"round": 3, "phase": "train", "done": 40, "total": 80}) == "round 3: train 40/80 clients"
    assert progress_text({"round": 3, "phase": "full valid", "done": 1200, "total": 46420}) == \
        "round 3: full valid 1,200/46,420 users"
    assert progress_text({"round": 0, "phase": "checkpoint", "done": 1, "total": 2}) == "round 0: checkpoint 1/2 pools"
    assert progress_text({"round": 4, "phase": "start", "done": 0, "total": 0}) == "round 4: start"
    assert progress_text({"round": 0, "phase": "start-up", "done": 0, "total": 0}) == "start-up"


def test_timing_separates_training_evaluation_and_checkpoints():
    from pipeline.federated.runtime.run import timing

    history = [{"round": 0, "time/train_seconds": 1.0, "time/eval_seconds": 0.001, "time/round_seconds": 1.2,
                "time/checkpoint_seconds": 0.5},
               {"round": 1, "time/train_seconds": 2.0, "time/eval_seconds": 10.0, "time/round_seconds": 12.5,
                "valid/hr@10": 0.1, "time/checkpoint_seconds": 0.5},
               {"round": 2, "time/train_seconds": 3.0, "time/eval_seconds": 20.0, "time/round_seconds": 23.5,
                "valid/hr@10": 0.2}]  # restored from a checkpoint written before its own time was known
    got = timing(history, startup_s=4.0)
    assert got == {"startup_s": 4.0, "train_s": 6.0, "eval_s": 30.001, "checkpoint_s": 1.0, "rounds_s": 38.2,
                   "rounds": 3, "evaluated_rounds": 2, "per_round_train_s": 2.0, "per_eval_s": 15.0005}
    assert timing([], startup_s=1.0)["per_round_train_s"] is None


def test_results_tables_split_the_run_time_where_summaries_record_it():
    from pipeline.report.tables import time_split

    older = None  # a summary written before the timing block
    assert time_split([older]) == ""
    note = time_split([older, {"startup_s": 30, "train_s": 60, "eval_s": 540, "checkpoint_s": 6},
                       {"startup_s": 30, "train_s": 60, "eval_s": 60, "checkpoint_s": 0}])
    assert note.startswith(" Of the 2 runs that record it: start-up 1.0 min, training 2.0 min, evaluation 10.0 min, "
                           "checkpoints 0.1 min")


def test_a_ctrl_c_swallowed_inside_a_blocking_call_still_stops_the_job():
    """A Ctrl-C whose KeyboardInterrupt a blocking call swallowed is remembered and raised at the
    next poll; outside the job the previous handler is back."""
    import signal

    from pipeline.federated.runtime.run import CtrlC

    before = signal.getsignal(signal.SIGINT)
    with CtrlC() as ctrl_c:
        ctrl_c.check()  # nothing pressed: nothing raised
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass  # what a library call might do with it
        with pytest.raises(KeyboardInterrupt):
            ctrl_c.check()
    assert signal.getsignal(signal.SIGINT) is before
