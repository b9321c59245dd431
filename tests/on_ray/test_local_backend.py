"""runtime.backend=local: the same round loop, server and pools in the command's own process.
It must play exactly the rounds the Ray backend plays, start no Ray at all, resume from its own
checkpoints, and stop on Ctrl-C as the Ray job does (the last complete checkpoint kept)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.data.datasets import data_root

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
TINY = ["data.synthetic={n_users: 60, n_items: 50, images: false, seed: 3}", "train.local_epochs=2",
        "train.batch_rows=16", "train.neg_ratio=2", "train.participation=0.7", "train.patience=50",
        "runtime.progress=false", "runtime.tensorboard=false", "runtime.pools=2"]
TIMES = ("time/", "mem/")  # what differs between two runs of the same rounds: durations and memory


def _numbers(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if not k.startswith(TIMES)} for m in history]


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _cli(out: Path, cache: Path, *sets: str, resume: bool = False, env_extra: dict | None = None,
         **popen) -> subprocess.Popen:
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONPATH": str(REPO),
           "PIPELINE_DATA_CACHE": str(cache), **(env_extra or {})}
    args = [sys.executable, "-m", "pipeline", "train", "--out", str(out), *(["--resume"] if resume else []),
            "--set", "runtime.backend=local", *sets]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


KU_FEDMR = ["data.name=ku", "model.dim=16", "model.fusion={d_f: 16, d_r: 8}",
            "train.local_epochs=1", "train.participation=0.5"]  # FedMR on the KU release's CLIP features
HAS_KU = (data_root() / "ku").is_dir()


@pytest.mark.parametrize("backbone, extra", [
    ("fedrap", ["train.also_protocols=[p1]"]),  # the pools evaluate a second protocol too
    pytest.param("fcf", KU_FEDMR, marks=[pytest.mark.realdata,
                                         pytest.mark.skipif(not HAS_KU, reason="KU data not available")])])
def test_local_backend_plays_the_rounds_of_the_ray_backend(local_ray, tmp_path, backbone, extra):
    from pipeline.federated.runtime.run import train

    runs = {}
    for backend in ("ray", "local"):
        config = load_config(None, [*TINY, f"model.backbone={backbone}", "train.rounds=3", *extra,
                                    f"runtime.backend={backend}", f"runtime.out={tmp_path / backend}"])
        summary = train(config, data_cache=tmp_path / "cache", quiet=True)
        runs[backend] = (summary, _rows(tmp_path / backend))
    (ray_summary, ray_rows), (local_summary, local_rows) = runs["ray"], runs["local"]
    assert len(local_rows) == 3
    for ours, theirs in zip(_numbers(local_rows), _numbers(ray_rows)):
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            assert ours[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert local_summary["selection"] == ray_summary["selection"]
    assert local_summary["pools"] == ray_summary["pools"] == 2
    assert local_summary["users_per_pool"] == ray_summary["users_per_pool"]
    assert "ray_s" not in local_summary["timing"]["startup_phases"] and "ray_s" in ray_summary["timing"]["startup_phases"]
    assert local_summary["machines"][0]["torch_threads"] == 1  # one pool's threads, as on Ray


def test_a_local_run_starts_no_ray_and_resumes_from_its_own_checkpoints(tmp_path):
    cache, ray_tmp = tmp_path / "cache", tmp_path / "ray-tmp"
    ray_tmp.mkdir()
    env = {"RAY_TMPDIR": str(ray_tmp)}  # where any Ray instance would put its session
    whole = _cli(tmp_path / "whole", cache, *TINY, "train.rounds=4", env_extra=env)
    _, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err[-3000:]
    first = _cli(tmp_path / "resumed", cache, *TINY, "train.rounds=2", env_extra=env)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    # as under `ray job submit`, which sets RAY_ADDRESS: said, and not joined
    again = _cli(tmp_path / "resumed", cache, *TINY, "train.rounds=4", resume=True,
                 env_extra={**env, "RAY_ADDRESS": "127.0.0.1:1"})
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    assert "the Ray cluster at RAY_ADDRESS (127.0.0.1:1) is not used" in err
    assert list(ray_tmp.iterdir()) == []  # no Ray session was started
    assert [m["round"] for m in _rows(tmp_path / "resumed")] == [0, 1, 2, 3]
    # the same numbers as the uninterrupted run (round 1 ended the first invocation: its stop flag says so)
    resumed, whole = _numbers(_rows(tmp_path / "resumed")), _numbers(_rows(tmp_path / "whole"))
    assert resumed[1].pop("stop") and not whole[1].pop("stop")
    assert resumed == whole
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["rounds_run"] == 4 and summary["config"]["runtime"]["backend"] == "local"
    assert summary["pools"] == 2 and summary["machines"][0]["torch_threads"] == 1


def test_ctrl_c_stops_a_local_run_and_keeps_its_last_checkpoint(tmp_path):
    from pipeline.federated.runtime.checkpoints import damage

    # rounds long enough to be interrupted in (FedNCF ranks 4,000 users x 3,000 items per split)
    slow = ["data.synthetic={n_users: 4000, n_items: 3000, images: false, seed: 3}", "model.backbone=fedncf",
            "train.protocol=p3", "train.rounds=3", "train.participation=0.02", "train.patience=50",
            "runtime.tensorboard=false", "runtime.progress=false"]
    out, cache = tmp_path / "run", tmp_path / "cache"
    first = _cli(out, cache, *slow, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():
        assert first.poll() is None, first.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGINT)  # Ctrl-C, in round 1
    interrupted = time.time()
    _, err = first.communicate(timeout=60)
    assert time.time() - interrupted < 30
    assert first.returncode == 130, err[-3000:]
    assert "interrupted (round 1:" in err and "round-000000; `--resume` continues from it" in err, err[-3000:]
    assert "Traceback" not in err
    # round 0's checkpoint and its best-round copy; no half-written folder of round 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best", "round-000000"]
    assert damage(out / "checkpoints" / "round-000000") is None
    assert not (out / "summary.json").exists()

    resumed = _cli(out, cache, *slow, resume=True)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert [m["round"] for m in _rows(out)] == [0, 1, 2]


def test_local_backend_refuses_a_named_cluster_before_writing_anything(tmp_path):
    from pipeline.federated.runtime.run import train

    config = load_config(None, [*TINY, "train.rounds=1", "runtime.backend=local", f"runtime.out={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match="runtime.backend=local trains in this process"):
        train(config, address="127.0.0.1:6379", data_cache=tmp_path / "cache", quiet=True)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra, device", [([], "cuda"), (["runtime.device=cpu"], "cpu"),
                                            (["model.fusion={d_f: 16, d_r: 8}"], "cpu"),
                                            (["model.fusion={d_f: 16, d_r: 8}", "runtime.device=cuda"], "cuda")])
def test_a_local_run_takes_a_visible_gpu_where_a_ray_pool_would(monkeypatch, extra, device):
    """Placement's rule in one process: an ID backbone under runtime.device=auto trains on a GPU the
    process sees, a model with FedMR's fusion module only when runtime.device=cuda asks. The GPU
    is faked (this machine may have none), and so is torch's answer that CUDA is there."""
    import torch

    from pipeline.federated.runtime.server import local_device

    config = load_config(None, [*TINY, *extra])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert local_device(config) == device
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # no GPU seen: the CPU, or an error if asked
    if device == "cuda" and "runtime.device=cuda" in extra:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        with pytest.raises(RuntimeError, match="torch sees no CUDA device"):
            local_device(config)
    else:
        assert local_device(config) == "cpu"
