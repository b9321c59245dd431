"""Fault report: every fault scenario run several times, each trial against the fault-free run.

    python -m bench.faults             # 3 trials per scenario (a few minutes on 2 cores)
    python -m bench.faults --quick     # 1 trial per scenario, smaller runs (about 2 min: starting the
                                       # cluster, a node and two driver processes dominates)
    python -m bench.faults --trials 5 --out results/faults.md

One local Ray cluster of three nodes on this machine (ray.cluster_utils.Cluster: a head (no CPUs) with
the driver and the Server actor, two worker nodes with the ClientPools). A trial is a FedRAP run
on the synthetic generator (FedRAP: personal dense heads and a personal sparse item table, the
state most at risk), checkpointed every round. Scenarios:

  pool killed mid-round   ray.kill of one pool while its round's training is in flight
  node removed            the worker node of a pool leaves the cluster mid-round
  driver killed, resumed  `python -m pipeline train` SIGKILLed after some rounds, rerun with --resume
  dropout 30%             train.dropout=0.3 (its fault-free run: the same config in one process, no Ray)
  corrupt checkpoint      the newest checkpoint's pool file overwritten with garbage, then a new
                          Server resumes (it must skip that checkpoint and replay from the one before)

Columns: trials; runs completed (every round run); client state lost (users whose final
personal state, read from the final checkpoint, differs from the fault-free run's; summed over
trials); metrics equal (trials whose validation and test metrics of every round equal the
fault-free run's, abs 1e-9). The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench._common import emit_json

REPO = Path(__file__).resolve().parents[1]
USERS, ITEMS = 300, 200  # --quick: 120, 100
BASE = ["model.backbone=fedrap", "train.local_epochs=5", "train.batch_rows=32", "train.neg_ratio=2",
        "train.participation=0.8", "train.patience=100", "runtime.pools=2", "runtime.checkpoint_every=1",
        "runtime.progress=false", "runtime.tensorboard=false"]
TOL = 1e-9


def base_overrides(users: int, items: int) -> list[str]:
    return [f"data.synthetic={{n_users: {users}, n_items: {items}, images: false, seed: 5}}", *BASE]


def make_config(ctx, out: Path, *extra: str):
    from pipeline.config import load_config

    return load_config(None, [*ctx.base, f"train.rounds={ctx.rounds}", f"runtime.out={out}", *extra])


# --- the cluster and one run -----------------------------------------------------------------------


def start_cluster():
    from ray.cluster_utils import Cluster

    quick_health = {"health_check_period_ms": 500, "health_check_failure_threshold": 4}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "_system_config": quick_health})
    for _ in range(2):
        cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    return cluster


def new_server(config, data_refs):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipeline.federated.runtime.server import Server

    head = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return Server.options(scheduling_strategy=head).remote(config.model_dump_json(), data_refs,
                                                           str(config.runtime.out))


def run_rounds(server, rounds: range, fault=None) -> list[dict]:
    """Rounds on `server`; fault(round, server, pending) is called once each round is submitted."""
    import ray

    history = []
    for round_ in rounds:
        pending = server.next_round.remote()
        if fault is not None:
            fault(round_, server, pending)
        history.append(ray.get(pending))
    return history


def in_flight(pending) -> bool:
    import ray

    ready, _ = ray.wait([pending], timeout=0)
    return not ready


# --- comparing a trial with the fault-free run --------------------------------------------------------


def personal_state(pool_states: list[dict], n_items: int) -> dict[int, dict[str, torch.Tensor]]:
    """user -> every personal tensor (dense rows, and the sparse table rows as (items, values))."""
    out = {}
    for state in pool_states:
        users = state["users"]
        for pos, user in enumerate(users.tolist()):
            mine = {name: rows[pos] for name, rows in state["dense"].items()}
            for name, table in state["tables"].items():
                at = table["keys"] // n_items == pos
                mine[f"{name}.items"] = table["keys"][at] % n_items
                mine[f"{name}.values"] = table["values"][at]
            out[user] = mine
    return out


def checkpoint_state(run_dir: Path, n_items: int) -> dict:
    from pipeline.federated.runtime.checkpoints import newest_intact

    folder, _ = newest_intact(run_dir / "checkpoints")
    manifest = json.loads((folder / "manifest.json").read_text())
    return personal_state([torch.load(folder / f"pool-{i}.pt", weights_only=False)
                           for i in range(manifest["pools"])], n_items)


def lost_clients(got: dict, want: dict) -> int:
    """Users whose personal state differs from the fault-free run's (or is missing)."""
    def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
        return a.shape != b.shape or (a.numel() > 0 and (a.double() - b.double()).abs().max().item() > TOL)

    return sum(1 for user, tensors in want.items()
               if user not in got or set(got[user]) != set(tensors)
               or any(differs(got[user][k], v) for k, v in tensors.items()))


def eval_metrics(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k.startswith(("valid/", "test/"))} for m in history]


def metrics_equal(got: list[dict], want: list[dict]) -> bool:
    a, b = eval_metrics(got), eval_metrics(want)
    return len(a) == len(b) and all(set(x) == set(y) and all(abs(x[k] - y[k]) <= TOL for k in x) for x, y in zip(a, b))


# --- scenarios: each returns (completed, history, run dir, notes) -------------------------------------


def scenario_pool_killed(ctx, trial: int, out: Path):
    import ray

    config = make_config(ctx, out)
    notes = {}
    server = new_server(config, ctx.refs)
    pools = ray.get(server.pool_handles.remote())  # asked now: the server answers nothing during a round

    def kill(round_, server, pending):
        if round_ == ctx.fault_round:
            time.sleep(ctx.rng.uniform(0.1, 0.7) * ctx.train_seconds)
            notes["mid_round"] = in_flight(pending)
            ray.kill(pools[trial % len(pools)], no_restart=False)  # Ray restarts it with a blank state

    history = run_rounds(server, range(ctx.rounds), kill)
    notes["recoveries"] = ray.get(server.summary.remote())["recoveries"]
    ray.kill(server)
    return len(history) == ctx.rounds, history, out, notes


def scenario_node_removed(ctx, trial: int, out: Path):
    import ray

    config = make_config(ctx, out)
    notes = {}
    server = new_server(config, ctx.refs)
    node_id = ray.get(server.pool_info.remote())[trial % 2]["node"]  # asked now: not during a round
    node = next(n for n in ctx.cluster.worker_nodes if n.node_id == node_id)

    def remove(round_, server, pending):
        if round_ == ctx.fault_round:
            time.sleep(ctx.rng.uniform(0.1, 0.7) * ctx.train_seconds)
            notes["mid_round"] = in_flight(pending)
            ctx.cluster.remove_node(node)

    history = run_rounds(server, range(ctx.rounds), remove)
    summary, info = ray.get(server.summary.remote()), ray.get(server.pool_info.remote())
    notes.update(recoveries=summary["recoveries"], pools_on_nodes=len({p["node"] for p in info}))
    ray.kill(server)
    ctx.cluster.add_node(num_cpus=2)  # back to two workers for the next trial
    ctx.cluster.wait_for_nodes()
    return len(history) == ctx.rounds, history, out, notes


def _train_cli(ctx, out: Path, resume: bool) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": ctx.cluster.address}
    args = [sys.executable, "-m", "pipeline", "train", "--out", str(out), "--json", *(["--resume"] if resume else []),
            "--set", *ctx.base, f"train.rounds={ctx.rounds}"]
    return subprocess.Popen(args, cwd=ctx.workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def scenario_driver_killed(ctx, trial: int, out: Path):
    victim = _train_cli(ctx, out, resume=False)
    log = out / "metrics.jsonl"
    kill_after = ctx.fault_round - 1 + trial % 2
    deadline = time.time() + 300
    while not (log.exists() and len(log.read_text().splitlines()) >= kill_after):
        if victim.poll() is not None or time.time() > deadline:
            return False, [], out, {"error": "the run ended before it could be killed"}
        time.sleep(0.02)
    time.sleep(ctx.rng.uniform(0.1, 0.7) * ctx.train_seconds)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = len(log.read_text().splitlines())
    done = _train_cli(ctx, out, resume=True)
    stdout, stderr = done.communicate(timeout=600)
    if done.returncode != 0:
        return False, [], out, {"error": stderr[-500:]}
    history = [json.loads(line) for line in log.read_text().splitlines()]
    return len(history) == ctx.rounds, history, out, {"killed_after_rounds": killed_at,
                                                     "mid_run": killed_at < ctx.rounds}


def scenario_dropout(ctx, trial: int, out: Path):
    import ray

    config = make_config(ctx, out, "train.dropout=0.3", f"train.seed={trial}")
    server = new_server(config, ctx.refs)
    history = run_rounds(server, range(ctx.rounds))
    ray.kill(server)
    dropped = sum(m["train/dropped"] for m in history)
    sampled = sum(m["train/sampled"] for m in history)
    reference_history, reference_state = in_process_run(ctx, config)
    return len(history) == ctx.rounds, history, out, {"dropped_fraction": round(dropped / sampled, 3),
                                                     "reference": (reference_history, reference_state)}


def scenario_corrupt_checkpoint(ctx, trial: int, out: Path):
    import ray

    config = make_config(ctx, out)
    server = new_server(config, ctx.refs)
    first = run_rounds(server, range(ctx.fault_round + 1))
    ray.kill(server)
    newest = sorted((out / "checkpoints").glob("round-*"))[-1]
    victim = newest / ("pool-0.pt" if trial % 2 == 0 else "global.pt")
    size = victim.stat().st_size
    with open(victim, "r+b") as handle:  # garbage in the middle: the file still opens as a zip
        handle.seek(size // 2)
        handle.write(os.urandom(min(4096, size // 4)))
    server = new_server(config, ctx.refs)
    start = ray.get(server.resume.remote())
    history = ray.get(server.history_so_far.remote()) + run_rounds(server, range(start, ctx.rounds))
    summary = ray.get(server.summary.remote())
    ray.kill(server)
    return len(history) == ctx.rounds, history, out, {
        "corrupted": f"{newest.name}/{victim.name}", "resumed_at_round": start,
        "skipped": summary["damaged_checkpoints"], "rounds_before_fault": len(first)}


def in_process_run(ctx, config) -> tuple[list[dict], dict]:
    """The same config without Ray: the same round loop (rounds.run_rounds) on in-process pools
    (the deterministic reference)."""
    from pipeline.federated.rounds import in_process, run_rounds as play

    strategy, pools = in_process(config, ctx.data, ctx.negatives, n_pools=config.runtime.pools)
    history = play(strategy, pools)
    return history, personal_state([s.store.state_dict() for s in pools.pools], ctx.data.n_items)


SCENARIOS = {
    "pool killed mid-round": scenario_pool_killed,
    "node removed": scenario_node_removed,
    "driver killed, resumed": scenario_driver_killed,
    "dropout 30%": scenario_dropout,
    "corrupt checkpoint": scenario_corrupt_checkpoint,
}


class Context:
    """What every trial shares: the cluster, the prepared data, the fault-free run."""

    def __init__(self, cluster, rounds: int, workdir: Path, seed: int, users: int, items: int):
        import ray

        from pipeline.data.datasets import open_dataset

        self.cluster, self.rounds, self.workdir = cluster, rounds, workdir
        self.base, self.users, self.items = base_overrides(users, items), users, items
        self.fault_round = max(1, rounds // 2)
        self.rng = np.random.default_rng(seed)
        config = make_config(self, workdir / "clean")
        self.data, self.negatives = open_dataset(config.data)
        self.refs = [ray.put(self.data), ray.put(self.negatives)]
        server = new_server(config, self.refs)
        self.clean_history = run_rounds(server, range(rounds))
        ray.kill(server)
        # a fault lands at a random point of the clients' training (rounds after the first)
        self.train_seconds = float(np.mean([m["time/train_seconds"] for m in self.clean_history[1:]]))
        self.clean_state = checkpoint_state(workdir / "clean", self.data.n_items)


def report(rows: list[dict], rounds: int, trials: int, seconds: float, users: int, items: int) -> str:
    lines = [f"Fault report: FedRAP on the synthetic generator ({users} users, {items} items), {rounds} rounds, 2 pools on a "
             f"3-node local Ray cluster, checkpoints every round; {trials} trial(s) per scenario; {seconds:.0f} s.",
             "", "| scenario | trials | runs completed | client state lost | metrics equal to the fault-free run |",
             "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['scenario']} | {row['trials']} | {row['completed']} | {row['state_lost']} | "
                     f"{row['metrics_equal']}/{row['trials']} |")
    lines += ["", "- Fault-free run: the same config without the fault, through the same Server and pools; for "
              "dropout 30%, the same config (the same dropped clients) run in one process without Ray.",
              "- Client state lost: users whose final personal state (FedRAP's heads and sparse personal item table, "
              "read from the final checkpoint) differs from the fault-free run's by more than 1e-9, summed over trials.",
              "- Metrics equal: trials whose validation and test metrics of every round equal the fault-free run's "
              "(abs 1e-9).", "", "Per trial:"]
    for row in rows:
        for note in row["notes"]:
            lines.append(f"- {row['scenario']}: {json.dumps(note, default=str)}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="1 trial per scenario, 4 rounds, 120 users")
    parser.add_argument("--scenarios", nargs="*", choices=list(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--out", type=Path, help="also write the table (Markdown) here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    trials, rounds = (1, 4) if args.quick else (args.trials, args.rounds)

    import ray

    os.environ.pop("RAY_ADDRESS", None)
    torch.set_num_threads(1)  # as a pool of one CPU: the in-process reference sums in the same order
    started = time.perf_counter()
    cluster = start_cluster()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="faults-") as tmp:
            users, items = (120, 100) if args.quick else (USERS, ITEMS)
            ctx = Context(cluster, rounds, Path(tmp), args.seed, users, items)
            print(f"fault-free run: {rounds} rounds, clients' training {ctx.train_seconds:.2f} s per round", flush=True)
            for name in args.scenarios:
                row = {"scenario": name, "trials": trials, "completed": 0, "state_lost": 0, "metrics_equal": 0,
                       "notes": []}
                for trial in range(trials):
                    out = Path(tmp) / f"{name.split()[0]}-{trial}"
                    completed, history, run_dir, notes = SCENARIOS[name](ctx, trial, out)
                    want_history, want_state = notes.pop("reference", (ctx.clean_history, ctx.clean_state))
                    lost = (lost_clients(checkpoint_state(run_dir, ctx.data.n_items), want_state) if completed
                            else len(want_state))
                    equal = completed and metrics_equal(history, want_history)
                    row["completed"] += int(completed)
                    row["state_lost"] += lost
                    row["metrics_equal"] += int(equal)
                    row["notes"].append({"trial": trial, "completed": completed, "state_lost": lost,
                                         "metrics_equal": equal, **notes})
                    print(f"{name} #{trial}: completed {completed}, client state lost {lost}, metrics equal {equal} "
                          f"{notes}", flush=True)
                rows.append(row)
    finally:
        ray.shutdown()
        cluster.shutdown()
    seconds = time.perf_counter() - started
    table = report(rows, rounds, trials, seconds, ctx.users, ctx.items)
    print(table)
    if args.out:
        command = "python -m bench.faults" + (" --quick" if args.quick else f" --trials {trials} --rounds {rounds}")
        args.out.write_text(f"<!-- made by: {command} --out {args.out} -->\n{table}")
    emit_json({"bench": "faults", "rounds": rounds, "trials": trials, "seconds": round(seconds, 1),
               "scenarios": {r["scenario"]: {k: r[k] for k in ("trials", "completed", "state_lost", "metrics_equal")}
                             for r in rows},
               "runs_lost": sum(r["trials"] - r["completed"] for r in rows),
               "client_state_lost": sum(r["state_lost"] for r in rows)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
