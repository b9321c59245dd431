"""The federated training job: the round loop on the driver, short enough to read at once.

The driver prepares the data, starts the Server actor (which starts the ClientPools), asks
for one round at a time, and writes what a user watches: a progress bar, TensorBoard
scalars, metrics.jsonl (one line per round) and summary.json at the end.

Run directory:
  config.yaml  metrics.jsonl  summary.json  tb/  checkpoints/
"""

from __future__ import annotations

import json
import shutil
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
from pipeline.rundir import LOCK, RunLock, check_resume

DATA_CACHE = Path("runs/prepared")


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
    (pipeline.rundir.check_resume)."""
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
    from pipeline.federated.schedule import eval_user_count
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

    from pipeline.federated.server import Server

    data, negatives = open_checked(config, data_cache)  # before anything is written or Ray starts
    (run_dir / "config.yaml").write_text(yaml.safe_dump(json.loads(config.model_dump_json()), sort_keys=False))
    ensure_ray(address)
    refs = [ray.put(data), ray.put(negatives)]
    # the server lives on the driver's node (losing another node costs pools, which recover);
    # inside a Tune trial it stays in the trial's placement group, where its pools go too
    in_trial = ray.util.get_current_placement_group() is not None
    here = None if in_trial else NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    server = Server.options(scheduling_strategy=here).remote(config.model_dump_json(), refs, str(run_dir))
    next_round = ray.get(server.resume.remote()) if resume else 0
    history = ray.get(server.history_so_far.remote())
    with open(run_dir / "metrics.jsonl", "w") as log:  # the restored history, then new rounds
        for metrics in history:
            log.write(json.dumps(metrics) + "\n")

    writer = SummaryWriter(str(run_dir / "tb"), purge_step=next_round) if config.runtime.tensorboard else None
    bar = tqdm(total=config.train.rounds, initial=next_round, desc=f"{config.model.backbone} rounds",
               unit="round", disable=quiet or not config.runtime.progress)
    stopped = bool(history and history[-1]["stop"])
    if stopped and resume:  # a run that reached its train.rounds goes on when a resume raises them
        stopped = ray.get(server.stopped_early.remote())
    while not stopped and next_round < config.train.rounds:
        metrics = ray.get(server.run_round.remote())
        history.append(metrics)
        with open(run_dir / "metrics.jsonl", "a") as log:
            log.write(json.dumps(metrics) + "\n")
        if writer:
            for name, value in _scalars(metrics).items():
                writer.add_scalar(name, value, metrics["round"])
            writer.flush()
        shown = {k.split("/")[-1]: f"{v:.4f}" for k, v in metrics.items() if k == f"valid/{config.train.selection()}"}
        bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", **shown)
        bar.update()
        if on_round is not None:
            on_round(metrics)
        next_round, stopped = metrics["round"] + 1, metrics["stop"]
    bar.close()
    if writer:
        writer.close()

    summary = {
        "config": json.loads(config.model_dump_json()),
        "dataset": data.identity(),
        "negatives": config.train.negatives_label(),
        **ray.get(server.summary.remote()),
        "seconds_total": round(time.perf_counter() - started, 3),
        "seconds_per_round_mean": (sum(m["time/round_seconds"] for m in history) / len(history)) if history else None,
        "clients_per_second_mean": (sum(m["time/clients_per_second"] for m in history) / len(history)) if history else None,
        "run_dir": str(run_dir),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    ray.kill(server)
    return summary
