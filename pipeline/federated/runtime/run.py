"""The federated training job: the round loop on the driver, short enough to read at once.

The driver prepares the data, starts the server (runtime.backend=ray: the Server actor, which
starts the ClientPools; local: a RoundServer over pools in this process), asks for one round at
a time, and writes what a user watches: a progress bar (on Ray with what the round in flight is
doing: clients trained, users evaluated), TensorBoard scalars, metrics.jsonl (one line per
round) and summary.json at the end.

Ctrl-C (SIGINT) at any phase stops the job within a poll interval: the Server and its pools are
killed, a checkpoint being written is dropped (checkpoints are renamed into place when complete,
so the last complete one stays intact), no summary.json is written, and `--resume` continues
from that checkpoint.

Run directory:
  config.yaml  metrics.jsonl  summary.json  tb/  checkpoints/
"""

from __future__ import annotations

import copy
import json
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import ray
import yaml
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

from pipeline.config import ExperimentConfig
from pipeline.data.cache import data_cache_root
from pipeline.data.datasets import open_dataset
from pipeline.federated.runtime.machine import peak_rss_bytes
from pipeline.ray_cluster import ray_address
from pipeline.rundir import LOCK, RunLock, check_resume

POLL_SECONDS = 0.5  # how often the driver asks the Server what the round in flight is doing


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped the job; the message says where and what a --resume continues from."""


def ensure_ray(address: str | None = None) -> None:
    """Join `address` (or RAY_ADDRESS), else start this job's own local instance
    (pipeline.ray_cluster: never whichever cluster happens to run here)."""
    from pipeline.ray_cluster import ensure_ray as start_or_join

    start_or_join(address, log_to_driver=False)


def _scalars(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if k not in ("round", "stop", "improved") and isinstance(v, (int, float))}


def train(config: ExperimentConfig, *, resume: bool = False, address: str | None = None,
          data_cache: Path | None = None, quiet: bool = False, fresh: bool = False,
          on_round: Callable[[dict], None] | None = None) -> dict:
    """Run (or resume) the federated job of `config`; returns the summary.
    fresh: delete what an earlier run left in the run directory first (not a running job's).
    on_round: called with every new round's metrics once they are written (a Tune trial reports them).
    The run directory is locked while the job writes it (pipeline.rundir.RunLock: a second job there
    fails at once); a resume must use the run's config up to rounds, patience and display keys
    (pipeline.rundir.check_resume).
    data_cache: the prepared-data cache (None: pipeline.data.cache.data_cache_root()).
    Ctrl-C raises Interrupted (a KeyboardInterrupt) once the job's actors are stopped."""
    started = time.perf_counter()
    run_dir = Path(config.runtime.out).resolve()
    with new_run_directory(run_dir), RunLock(run_dir):  # one writer per run directory, to the summary
        if fresh and not resume:
            empty_run_dir(run_dir)
        if not resume and (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").iterdir()):
            raise FileExistsError(f"{run_dir} already holds a run: pass --resume to continue it, "
                                  f"or choose another runtime.out")
        if resume:
            check_resume(run_dir, config)  # before anything is written or Ray starts
        return _train(config, run_dir, started, resume=resume, address=address, data_cache=data_cache,
                      quiet=quiet, on_round=on_round)


@contextmanager
def new_run_directory(run_dir: Path):
    """A run directory this job creates is removed again when the job fails before writing into it
    (a refused dataset or config leaves no empty folder behind)."""
    existed = run_dir.exists()
    try:
        yield
    except BaseException:
        if not existed and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()
        raise


def open_checked(config: ExperimentConfig, data_cache: Path | None = None):
    """The prepared dataset and P1 negatives, checked against what the config reads (the fusion
    module's feature modalities, train.eval_users): every such mistake is reported before Ray starts."""
    from pipeline.federated.strategy.schedule import eval_user_count
    from pipeline.models.fusion import check_features

    data, negatives = open_dataset(config.data, cache=data_cache_root(data_cache))
    check_features(config.model.fusion, data.features, data.name)
    eval_user_count(config.train, data.n_users)  # train.eval_users: a count within the dataset's users
    return data, negatives


def empty_run_dir(run_dir: Path) -> None:
    """Remove what an earlier run left in `run_dir`, all but the lock this job holds."""
    for entry in run_dir.iterdir():
        if entry.name == LOCK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _train(config: ExperimentConfig, run_dir: Path, started: float, *, resume: bool, address: str | None,
           data_cache: Path | None, quiet: bool, on_round: Callable[[dict], None] | None) -> dict:
    from torch.utils.tensorboard import SummaryWriter

    phases = StartupPhases(started)
    data, negatives = open_checked(config, data_cache)  # before anything is written or Ray starts
    phases.done("data_s")
    if config.runtime.backend == "local" and address:
        raise ValueError(f"runtime.backend=local trains in this process, but a Ray cluster was named "
                         f"({address}): drop the address, or set runtime.backend=ray")
    if config.runtime.backend == "local" and ray_address(None) and not quiet:
        # (a job under `ray job submit` has RAY_ADDRESS set: it trains in its own process on that node)
        print(f"runtime.backend=local: training in this process; the Ray cluster at RAY_ADDRESS "
              f"({ray_address(None)}) is not used (runtime.backend=ray uses it)", file=sys.stderr)
    writer = bar = None
    with _start_server(config, data, negatives, run_dir, address, phases) as server, CtrlC() as ctrl_c:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(json.loads(config.model_dump_json()), sort_keys=False))
        try:  # Ctrl-C from here on: the job's actors are stopped and the message says what to resume
            next_round = server.call("resume") if resume else 0
            history = server.call("history_so_far")
            phases.done("server_s")  # the server up (and a checkpoint restored); Ray's pools still starting
            with open(run_dir / "metrics.jsonl", "w") as log:  # the restored history, then new rounds
                for metrics in history:
                    log.write(json.dumps(metrics) + "\n")

            writer = SummaryWriter(str(run_dir / "tb"), purge_step=next_round) if config.runtime.tensorboard else None
            bar = tqdm(total=config.train.rounds, initial=next_round, desc=f"{config.model.backbone} rounds",
                       unit="round", disable=quiet or not config.runtime.progress)
            stopped = bool(history and history[-1]["stop"])
            if stopped and resume:  # a run that reached its train.rounds goes on when a resume raises them
                stopped = server.call("stopped_early")
            rounds_started = time.perf_counter()
            show = bar if not bar.disable else None
            if show is not None:
                server.watch_progress()
            while not stopped and next_round < config.train.rounds:
                metrics = server.next_round(show, ctrl_c)
                if "first_round_s" not in phases.seconds:
                    phases.done("first_round_s")  # the pools' start-up, then the round itself
                history.append(metrics)
                with open(run_dir / "metrics.jsonl", "a") as log:
                    log.write(json.dumps(metrics) + "\n")
                if writer:
                    driver_peak = peak_rss_bytes()
                    extra = {} if driver_peak is None else {"mem/peak_rss_gb/driver": driver_peak / 2 ** 30}
                    for name, value in {**_scalars(metrics), **extra}.items():
                        writer.add_scalar(name, value, metrics["round"])
                    writer.flush()
                shown = {k.split("/")[-1]: f"{v:.4f}" for k, v in metrics.items() if k == f"valid/{config.train.selection()}"}
                bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", **shown)
                bar.update()
                if on_round is not None:
                    on_round(metrics)
                next_round, stopped = metrics["round"] + 1, metrics["stop"]
            ctrl_c.check()
        except KeyboardInterrupt:
            if bar is not None:
                bar.close()
            if writer:
                writer.close()
            raise Interrupted(_stop_interrupted(server, run_dir)) from None
        bar.close()
        if writer:
            writer.close()
        server_summary = server.call("summary")

    driver_peak = peak_rss_bytes()
    if driver_peak is not None:
        server_summary["peak_rss_gb"]["driver"] = round(driver_peak / 2 ** 30, 4)
    summary = {
        "config": json.loads(config.model_dump_json()),
        "dataset": data.identity(),
        "negatives": config.train.negatives_label(),
        **server_summary,
        "seconds_total": round(time.perf_counter() - started, 3),
        "timing": {**timing(history, startup_s=rounds_started - started), "startup_phases": phases.seconds},
        "finished_at": time.time(),  # (wall clock) a benchmark's process exit minus this is Ray's shutdown
        # the mean of time/round_seconds: training, evaluation and the rest of a round together
        # (checkpoints excluded); timing separates them
        "seconds_per_round_mean": (sum(m["time/round_seconds"] for m in history) / len(history)) if history else None,
        "clients_per_second_mean": (sum(m["time/clients_per_second"] for m in history) / len(history)) if history else None,
        "run_dir": str(run_dir),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


@contextmanager
def _start_server(config: ExperimentConfig, data, negatives, run_dir: Path, address: str | None,
                  phases: "StartupPhases"):
    """The run's server as the driver calls it (runtime.backend): a Server actor and its ClientPool
    actors on Ray, or a RoundServer over pools in this process; stopped when the job leaves."""
    if config.runtime.backend == "local":
        import torch

        from pipeline.federated.runtime.server import RoundServer

        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, int(config.runtime.cpus_per_pool or 1)))  # as one Ray pool's threads
        try:
            yield InProcessServer(RoundServer.in_process(config, data, negatives, run_dir))
        finally:
            torch.set_num_threads(threads)
        return
    from pipeline.federated.runtime.server import Server

    ensure_ray(address)
    phases.done("ray_s")
    refs = [ray.put(data), ray.put(negatives)]
    # the server lives on the driver's node (losing another node costs pools, which recover);
    # inside a Tune trial it stays in the trial's placement group, where its pools go too
    in_trial = ray.util.get_current_placement_group() is not None
    here = None if in_trial else NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    gpus = server_gpus(config.runtime, in_trial)
    actor = ActorServer(Server.options(scheduling_strategy=here, num_gpus=gpus)
                        .remote(config.model_dump_json(), refs, str(run_dir)))
    try:
        yield actor
    finally:
        actor.stop()


def server_gpus(runtime, in_trial: bool) -> float:
    """runtime.server_gpus, checked against the driver's node, where the Server lives: a share it
    cannot get would leave the job waiting for it forever."""
    wanted = runtime.server_gpus
    if not wanted:
        return 0.0
    if in_trial:
        raise ValueError(f"runtime.server_gpus={wanted} in a Tune trial: a trial reserves CPUs for its driver and "
                         f"pools only; set runtime.server_gpus=0 in the sweep's `set:`")
    node = ray.get_runtime_context().get_node_id()
    have = next((n["Resources"].get("GPU", 0.0) for n in ray.nodes() if n["NodeID"] == node and n["Alive"]), 0.0)
    if have < wanted:
        raise ValueError(f"runtime.server_gpus={wanted}: the driver's node, where the Server lives, has {have:g} "
                         f"GPU(s); run the driver on a GPU node (a cluster's head) or set runtime.server_gpus=0")
    return wanted


class InProcessServer:
    """A RoundServer in the driver's process, called as the driver calls the Server actor."""

    def __init__(self, server):
        self.server = server

    def call(self, method: str, *args):
        """The answer as a copy, as a Ray call returns one (the driver extends the history it gets)."""
        return copy.deepcopy(getattr(self.server, method)(*args))

    def watch_progress(self) -> None:
        """(The bar shows whole rounds: the round runs in this thread.)"""

    def progress(self) -> dict:
        return self.server.progress()

    def next_round(self, bar, ctrl_c) -> dict:
        return self.server.next_round()

    def stop(self) -> None:
        """(Nothing runs once a call returns or is interrupted.)"""


class ActorServer:
    """The Server actor: each call a ray.get of the method's remote call."""

    def __init__(self, actor):
        self.actor = actor

    def call(self, method: str, *args):
        return ray.get(getattr(self.actor, method).remote(*args))

    def watch_progress(self) -> None:
        self.call("watch_progress")

    def progress(self) -> dict:
        """What the round in flight is doing (the Server answers it while a round runs)."""
        return ray.get(self.actor.progress.remote(), timeout=2)

    def next_round(self, bar, ctrl_c) -> dict:
        return _await_round(self.actor, bar, ctrl_c)

    def stop(self) -> None:
        """Kill the Server (its pools go with it)."""
        ray.kill(self.actor, no_restart=True)


class StartupPhases:
    """Seconds from the job's start to each phase's end, as differences: data_s (open and check the
    prepared data), ray_s (start or join Ray), server_s (the Server actor up), first_round_s (the
    first round of this invocation, the pools' start-up included). started_at: the job's start on
    the wall clock, for a caller timing what came before it (imports)."""

    def __init__(self, started: float):
        self.last = started
        self.seconds: dict[str, float] = {"started_at": time.time() - (time.perf_counter() - started)}

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self.last, 3)
        self.last = now


def timing(history: list[dict], startup_s: float) -> dict:
    """Where the time went, in seconds. startup_s: this invocation's start-up (data, Ray, actors,
    restoring a checkpoint) before its first round; train_s, eval_s, checkpoint_s and rounds_s:
    sums over every round of the history (a resumed run's earlier rounds as they were recorded;
    the last checkpoint a run restored from is not timed); per_round_train_s: train_s per round;
    per_eval_s: eval_s per evaluated round."""
    def total(key: str) -> float:
        return float(sum(m.get(key, 0.0) for m in history))

    evaluated = [m for m in history if m.get("time/eval_seconds", 0.0) > 0 and any(k.startswith("valid/") for k in m)]
    train_s, eval_s = total("time/train_seconds"), total("time/eval_seconds")
    rounds = len(history)
    return {"startup_s": round(startup_s, 3), "train_s": round(train_s, 3), "eval_s": round(eval_s, 3),
            "checkpoint_s": round(total("time/checkpoint_seconds"), 3),
            "rounds_s": round(total("time/round_seconds") + total("time/checkpoint_seconds"), 3),
            "rounds": rounds, "evaluated_rounds": len(evaluated),
            "per_round_train_s": round(train_s / rounds, 4) if rounds else None,
            "per_eval_s": round(eval_s / len(evaluated), 4) if evaluated else None}


def progress_text(progress: dict) -> str:
    """The bar's postfix while a round runs: e.g. 'round 3: valid 1,200/4,000 users'."""
    phase, done, total = progress.get("phase"), progress.get("done", 0), progress.get("total", 0)
    if phase == "start-up":  # creating pools, restoring a checkpoint
        return "start-up"
    if phase in (None, "start") or not total:
        return f"round {progress.get('round', '?')}: {phase or 'start'}"
    unit = "clients" if phase == "train" else "pools" if phase.startswith("checkpoint") else "users"
    return f"round {progress['round']}: {phase} {done:,}/{total:,} {unit}"


class CtrlC:
    """Remembers a Ctrl-C (SIGINT) while the job runs, so that one pressed while a blocking Ray
    call is under way stops the job even if that call swallows the KeyboardInterrupt it raised:
    check() raises it at the next poll. Only in the main thread (signals go there); elsewhere
    (a Tune trial's thread) it does nothing."""

    def __init__(self) -> None:
        self.pressed = False
        self._previous = None

    def __enter__(self) -> "CtrlC":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.pressed = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.pressed:
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _await_round(server, bar, ctrl_c: CtrlC | None = None) -> dict:
    """The next round's metrics; meanwhile (every POLL_SECONDS) `bar` shows what the round is
    doing. Waiting in short steps also lets Ctrl-C through at once."""
    pending = server.next_round.remote()
    while True:
        ready, _ = ray.wait([pending], timeout=POLL_SECONDS)
        if ctrl_c is not None:
            ctrl_c.check()
        if ready:
            return ray.get(pending)
        if bar is not None:
            bar.set_postfix_str(progress_text(ray.get(server.progress.remote())))


def _stop_interrupted(server: "InProcessServer | ActorServer", run_dir: Path) -> str:
    """Ctrl-C: say what the round in flight was doing, stop the server (a Server actor's pools go
    with it), drop a half-written checkpoint folder, and name the checkpoint a resume continues from."""
    from pipeline.federated.runtime.checkpoints import newest_intact

    try:
        doing = progress_text(server.progress())
    except Exception:  # noqa: BLE001 - the server may already be gone; the message says less
        doing = "round in flight"
    server.stop()
    folder = run_dir / "checkpoints"
    for partial in folder.glob(".*") if folder.is_dir() else ():  # write_atomically's temporary folders
        shutil.rmtree(partial, ignore_errors=True)
    last, _ = newest_intact(folder)
    where = (f"the last complete checkpoint is {last}; `--resume` continues from it" if last is not None
             else "no checkpoint was complete; `--resume` starts again from round 0")
    return f"interrupted ({doing}): {where}"
