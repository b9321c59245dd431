"""The engine on real Ray: a 2-node cluster on one machine, a pool killed mid-run, a killed
driver resumed from its checkpoint. Each must end with exactly the metrics of an
uninterrupted run (the math is deterministic and independent of placement)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from pipeline.config import load_config
from pipeline.data.datasets import open_dataset
from pipeline.federated.rounds import in_process, run_rounds
from pipeline.federated.runtime.server import Server

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
TINY = ["data.synthetic={n_users: 60, n_items: 50, images: false, seed: 3}", "train.local_epochs=2",
        "train.batch_rows=16", "train.neg_ratio=2", "train.participation=0.7", "train.patience=50",
        "runtime.progress=false", "runtime.tensorboard=false"]


def tiny_config(tmp_path, backbone="fedrap", rounds=4, pools=3, extra=()):
    return load_config(None, [*TINY, f"model.backbone={backbone}", f"train.rounds={rounds}",
                              f"runtime.pools={pools}", f"runtime.out={tmp_path}", *extra])


def reference_history(config, rounds):
    """The same run without Ray: the same round loop (rounds.run_rounds) on in-process pools."""
    data, negatives = open_dataset(config.data)
    strategy, pools = in_process(config, data, negatives, n_pools=config.runtime.pools)
    return valid_metrics(run_rounds(strategy, pools, rounds=rounds))


def run_server(config, data_cache, rounds, after_submit=None):
    data, negatives = open_dataset(config.data, cache=data_cache)
    server = Server.remote(config.model_dump_json(), [ray.put(data), ray.put(negatives)], str(config.runtime.out))
    history = []
    for r in range(rounds):
        pending = server.next_round.remote()
        if after_submit:
            after_submit(r, server)
        history.append(ray.get(pending))
    summary = ray.get(server.summary.remote())
    info = ray.get(server.pool_info.remote())
    ray.kill(server)
    return history, summary, info


def valid_metrics(history):
    return [{k[6:]: v for k, v in m.items() if k.startswith("valid/")} for m in history]


@pytest.fixture(scope="module")
def two_node_cluster():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_pools_on_two_nodes_match_the_reference(two_node_cluster, tmp_path):
    config = tiny_config(tmp_path / "run", pools=3)
    history, summary, info = run_server(config, tmp_path / "data", rounds=3)
    assert len({pool["node"] for pool in info}) == 2, info  # pools really span both nodes
    assert summary["recoveries"] == 0
    # the summary names what the pools ran on (one machine here: both nodes are this host)
    from pipeline.federated.runtime.machine import describe

    assert summary["machines"] == [{**describe(), "torch_threads": 1}]   # pools: 1 CPU, one torch thread
    assert summary["machines"][0]["cpu_capability"] and summary["machines"][0]["torch"]
    reference = reference_history(config, 3)
    for got, want in zip(valid_metrics(history), reference):
        assert got == pytest.approx(want, abs=1e-9)
    assert history[-1]["train/clients"] == 42  # 70% of 60 users


def test_killed_pool_is_restored_and_the_run_matches(two_node_cluster, tmp_path):
    clean = tiny_config(tmp_path / "clean", backbone="pfedrec", rounds=5)
    clean_history, _, _ = run_server(clean, tmp_path / "data", rounds=5)

    def kill_in_round_three(round_, server):
        if round_ == 2:
            pools = ray.get(server.pool_handles.remote())
            ray.kill(pools[1], no_restart=False)  # Ray restarts it with a blank state

    faulty = tiny_config(tmp_path / "faulty", backbone="pfedrec", rounds=5)
    history, summary, _ = run_server(faulty, tmp_path / "data", rounds=5, after_submit=kill_in_round_three)
    assert summary["recoveries"] >= 1
    assert valid_metrics(history) == valid_metrics(clean_history)
    assert summary["selection"] == _selection(clean_history, clean)


def _selection(history, config):
    from pipeline.federated.strategy.selection import Selection

    selection = Selection(config.train.selection(), config.train.patience)
    for m in history:
        selection.update(m["round"], m)
    return selection.report()


def _train_cli(out: Path, rounds: int, resume: bool = False) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    args = [sys.executable, "-m", "pipeline", "train", "--out", str(out), "--json", *(["--resume"] if resume else []),
            "--set", *TINY, "model.backbone=fcf", f"train.rounds={rounds}", "runtime.pools=2"]
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_driver_resumes_to_identical_metrics(tmp_path):
    rounds = 40  # long enough to kill it midway
    uninterrupted = _train_cli(tmp_path / "clean", rounds)
    out, err = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, err[-2000:]
    clean_summary = json.loads(out)

    victim = _train_cli(tmp_path / "killed", rounds)
    log = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (log.exists() and len(log.read_text().splitlines()) >= 3):
        assert victim.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = len(log.read_text().splitlines())
    assert killed_at < rounds
    done = _train_cli(tmp_path / "killed", rounds, resume=True)
    stdout, stderr = done.communicate(timeout=300)
    assert done.returncode == 0, stderr[-2000:]
    summary = json.loads(stdout)
    assert summary["selection"] == clean_summary["selection"]
    lines = lambda path: [json.loads(line) for line in path.read_text().splitlines()]  # noqa: E731
    clean_rows = lines(tmp_path / "clean" / "metrics.jsonl")
    resumed_rows = lines(tmp_path / "killed" / "metrics.jsonl")
    assert [r["round"] for r in resumed_rows] == list(range(rounds))
    assert valid_metrics(resumed_rows) == valid_metrics(clean_rows)
