"""The centralized job: a CentralizedTrainer on every Ray Train worker (TorchTrainer).

Every worker trains its share of each global batch and evaluates its share of the users; rank 0
reports a checkpoint (state.pt: model, best model, optimizers, selection, history) every
`centralized.checkpoint_every` epochs through `ray.train.report`. A callback on the Ray Train
controller (which runs on the driver's node) writes what a user watches, as the federated job
does: metrics.jsonl (one line per epoch) and TensorBoard scalars; the driver shows a progress
bar and writes summary.json at the end. Called inside a Ray Tune trial, the epochs' metrics also
reach the trial (TuneReportCallback).

Run directory (runtime.out):
  config.yaml  metrics.jsonl  summary.json  tb/  ray_train/centralized/epoch-NNNN/ (checkpoints)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import ray
import yaml
from ray.train import UserCallback
from tqdm import tqdm

from pipeline.config import ExperimentConfig
from pipeline.federated.runtime.run import _scalars, empty_run_dir, ensure_ray, new_run_directory, open_checked
from pipeline.rundir import RunLock, check_resume
from pipeline.federated.strategy.selection import Selection

STATE_FILE = "state.pt"
TRAIN_DIR = "ray_train"
RUN_NAME = "centralized"


def _train_loop(loop_config: dict) -> None:
    """Ray Train's train_loop_per_worker."""
    import torch
    import ray.train
    import ray.train.torch

    from pipeline.centralized.trainer import CentralizedTrainer

    # multi-threaded CPU kernels otherwise sum in a run-dependent order (FedMR's scatters): a seed
    # must give one result. The worker process is Ray Train's own, so the switch stays local to it
    torch.use_deterministic_algorithms(True)
    config = ExperimentConfig.model_validate_json(loop_config["config"])
    data, negatives = ray.get(loop_config["data"]), ray.get(loop_config["negatives"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    # no DDP wrapper: the trainer all-reduces the gradients itself (dense flat, per-user tables sparse);
    # torch DDP with these sparse tables drifted from the 1-worker run at ~1e-5 after two epochs
    wrap = lambda model: ray.train.torch.prepare_model(model, parallel_strategy=None)  # noqa: E731
    trainer = CentralizedTrainer(config, data, negatives, rank=rank, world=world,
                                 device=ray.train.torch.get_device(), wrap=wrap)
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as folder:
            trainer.load_state_dict(torch.load(Path(folder) / STATE_FILE, weights_only=False))
    every = config.centralized.checkpoint_every
    while not trainer.done():
        metrics = trainer.run_epoch()
        if rank == 0 and (metrics["stop"] or trainer.epoch % every == 0):
            with tempfile.TemporaryDirectory() as folder:
                torch.save(trainer.state_dict(), Path(folder) / STATE_FILE)
                (Path(folder) / "history.json").write_text(json.dumps(trainer.history))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                                 checkpoint_dir_name=f"epoch-{metrics['epoch']:04d}")
        else:
            ray.train.report(metrics)


class RunLog(UserCallback):
    """metrics.jsonl and TensorBoard scalars of every reported epoch (rank 0's metrics)."""

    def __init__(self, run_dir: str, tensorboard: bool, purge_step: int):
        self.run_dir, self.tensorboard, self.purge_step = run_dir, tensorboard, purge_step
        self._writer = None

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        epoch_metrics = metrics[0]
        with open(Path(self.run_dir) / "metrics.jsonl", "a") as log:
            log.write(json.dumps(epoch_metrics) + "\n")
        if self.tensorboard:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(Path(self.run_dir) / "tb"), purge_step=self.purge_step)
            for name, value in _scalars(epoch_metrics).items():
                if name != "epoch":
                    self._writer.add_scalar(name, value, epoch_metrics["epoch"])
            self._writer.flush()


def _tune_report() -> list:
    """Inside a Ray Tune trial: Ray's TuneReportCallback, which hands every epoch's metrics (rank
    0's) to the trial; elsewhere nothing (the callback refuses to be built outside a trial)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    try:
        return [TuneReportCallback()]
    except RuntimeError:
        return []


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run (None: none yet)."""
    folder = Path(run_dir) / TRAIN_DIR / RUN_NAME
    done = sorted(p for p in folder.glob("epoch-*") if (p / STATE_FILE).is_file() and (p / "history.json").is_file())
    return done[-1] if done else None


def _summary_selection(config: ExperimentConfig, history: list[dict]) -> Selection:
    selection = Selection(config.train.selection(), config.centralized.patience)
    for metrics in history:
        selection.update(metrics["epoch"], metrics)
    return selection


def refuse_eval_schedule(config: ExperimentConfig) -> None:
    """The centralized bound evaluates every user after every epoch: an evaluation schedule
    (train.eval_every, eval_round0, eval_users) is refused rather than silently ignored."""
    train, default = config.train, type(config.train)()
    keys = [f"train.{key}={getattr(train, key)}" for key in ("eval_every", "eval_round0", "eval_users")
            if getattr(train, key) != getattr(default, key)]
    if keys:
        raise ValueError(f"{', '.join(keys)}: the centralized bound evaluates every user after every epoch and "
                         f"follows no evaluation schedule; drop these keys (or set them to their defaults: "
                         f"eval_every=1, eval_round0=true, eval_users=null) for the centralized run")


def train_centralized(config: ExperimentConfig, *, resume: bool = False, address: str | None = None,
                      data_cache: Path | None = None, quiet: bool = False, fresh: bool = False) -> dict:
    """Run (or resume) the centralized job of `config` on Ray Train; returns the summary."""
    started = time.perf_counter()
    if config.model.gfmfr is not None:
        raise ValueError("model.gfmfr: GFMFR's groups and distillation are federated mechanisms with no pooled "
                         "counterpart; train the centralized bound of the backbone (+ FedMR) without it")
    if config.privacy is not None:
        raise ValueError("privacy: client-level DP bounds what clients upload; pooled training has no uploads. "
                         "Drop the privacy section for the centralized bound")
    refuse_eval_schedule(config)
    run_dir = Path(config.runtime.out).resolve()
    with new_run_directory(run_dir), RunLock(run_dir):  # one writer per run directory (a second job fails at once)
        if fresh and not resume:
            empty_run_dir(run_dir)
        restored = latest_checkpoint(run_dir)
        if restored is not None and not resume:
            raise FileExistsError(f"{run_dir} already holds a run: pass --resume to continue it, "
                                  f"or choose another runtime.out")
        if resume:
            check_resume(run_dir, config)  # the stored config, up to epochs, patience and display keys
        return _train_centralized(config, run_dir, restored, started, address=address, data_cache=data_cache,
                                  quiet=quiet)


def _train_centralized(config: ExperimentConfig, run_dir: Path, restored: Path | None, started: float, *,
                       address: str | None, data_cache: Path, quiet: bool) -> dict:
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    central = config.centralized
    data, negatives = open_checked(config, data_cache)  # before anything is written or Ray starts
    (run_dir / "config.yaml").write_text(yaml.safe_dump(json.loads(config.model_dump_json()), sort_keys=False))
    history = json.loads((restored / "history.json").read_text()) if restored is not None else []
    if restored is None:  # a fresh start: what an interrupted first epoch left goes
        shutil.rmtree(run_dir / TRAIN_DIR, ignore_errors=True)
        shutil.rmtree(run_dir / "tb", ignore_errors=True)
    with open(run_dir / "metrics.jsonl", "w") as log:  # the restored history, then new epochs
        for metrics in history:
            log.write(json.dumps(metrics) + "\n")

    # Ray Train's controller takes a report every health-check interval (default 2 s): an epoch
    # of a small dataset is shorter. Set before a local cluster starts, so its processes inherit it
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    ensure_ray(address)
    loop_config = {"config": config.model_dump_json(), "data": ray.put(data), "negatives": ray.put(negatives)}
    trainer = TorchTrainer(
        _train_loop, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=central.workers, use_gpu=central.use_gpu,
                                     resources_per_worker={"CPU": central.cpus_per_worker}),
        run_config=RunConfig(name=RUN_NAME, storage_path=str(run_dir / TRAIN_DIR),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             callbacks=[RunLog(str(run_dir), config.runtime.tensorboard, len(history)),
                                        *_tune_report()]))
    # resuming needs no argument: the same name and storage_path make Ray Train V2 restore the
    # run's latest checkpoint, which the workers read through ray.train.get_checkpoint()

    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = trainer.fit()
        except Exception as error:  # raised again below, on the caller's thread
            outcome["error"] = error

    fit = threading.Thread(target=run, daemon=True)
    fit.start()
    bar = tqdm(total=central.epochs, initial=len(history), desc=f"{config.model.backbone} centralized epochs",
               unit="epoch", disable=quiet or not config.runtime.progress)
    shown = len(history)
    while fit.is_alive() or shown < _lines(run_dir / "metrics.jsonl"):
        fit.join(timeout=0.5)
        lines = _lines(run_dir / "metrics.jsonl")
        if lines > shown:
            bar.update(lines - shown)
            shown = lines
    bar.close()
    if "error" in outcome:
        raise RuntimeError(f"centralized training failed: {outcome['error']}") from outcome["error"]
    if outcome["result"].error is not None:
        raise RuntimeError(f"centralized training failed: {outcome['result'].error}")
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    selection = _summary_selection(config, history)
    seconds = [m["time/epoch_seconds"] for m in history]
    summary = {
        "config": json.loads(config.model_dump_json()),
        "mode": "centralized",
        "dataset": data.identity(),
        "selection": selection.report(),
        "rounds_run": len(history),  # epochs: named as in the federated summary, which tables read
        "epochs_run": len(history),
        "workers": central.workers,
        "checkpoint": str(latest_checkpoint(run_dir)),
        "seconds_total": round(time.perf_counter() - started, 3),
        "seconds_per_epoch_mean": sum(seconds) / len(seconds) if seconds else None,
        "run_dir": str(run_dir),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _lines(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    except FileNotFoundError:
        return 0
