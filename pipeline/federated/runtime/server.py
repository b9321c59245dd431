"""The server of a run: RoundServer holds its Strategy (the round policy and the server state),
its Pools, its Checkpoints and what the round in flight is doing, and plays rounds with
rounds.run_rounds, one call at a time for the driver (pipeline.federated.runtime.run), which
writes what a user watches. Server is RoundServer as a Ray actor over RayPools (the ClientPool
actors; runtime.backend=ray); runtime.backend=local calls a RoundServer over LocalPools in the
driver's own process.

Checkpoint layout (one folder per round, renamed into place when complete):
  <run>/checkpoints/round-000007/{global.pt, pool-0.pt, ..., manifest.json}
  <run>/checkpoints/best/...   the same, at the best validation round so far
"""

from __future__ import annotations

from pathlib import Path

import ray

from pipeline.config import ExperimentConfig
from pipeline.federated.backend import PoolLost, Progress, training_device
from pipeline.federated.runtime.checkpoints import Checkpoints
from pipeline.federated.runtime.machine import peak_rss_bytes
from pipeline.federated.runtime.placement import plan_pools
from pipeline.federated.runtime.pool import RayPools
from pipeline.federated.rounds import run_rounds
from pipeline.federated.strategy import Strategy


def _gb(nbytes: int | None) -> float | None:
    return None if nbytes is None else round(nbytes / 2 ** 30, 4)


class RoundServer:
    """A run's rounds, one next_round() at a time, over any backend.Pools."""

    def __init__(self, config: ExperimentConfig, strategy: Strategy, pools, run_dir: str | Path):
        self.config, self.strategy, self.pools = config, strategy, pools
        self.checkpoints = Checkpoints(Path(run_dir))
        self._progress = Progress()
        self.peak_rss: dict[str, float] = {}  # GB per process (pool-<i>, server): the highest seen

    @classmethod
    def in_process(cls, config: ExperimentConfig, data, negatives, run_dir: str | Path) -> "RoundServer":
        """runtime.backend=local: runtime.pools pools (default one) as LocalPools in this process,
        on local_device(config)."""
        from pipeline.federated.backend import LocalPools

        strategy = Strategy(config, data, n_pools=config.runtime.pools or 1)
        return cls(config, strategy, LocalPools(config, data, negatives, strategy, device=local_device(config)), run_dir)

    def next_round(self) -> dict:
        """Play the next round (rounds.run_rounds: train, aggregate, evaluate, checkpoint; a round
        that loses a pool is redone from the last checkpoint); its metrics."""
        played = run_rounds(self.strategy, self.pools, rounds=1, checkpoints=self.checkpoints,
                            progress=self._progress)
        if not played:
            raise RuntimeError(f"the run is over after {self.strategy.next_round} rounds (train.rounds="
                               f"{self.config.train.rounds}, or patience exhausted): no round left to play")
        self._note_peaks(played[0])
        return played[0]

    def resume(self) -> int:
        """Continue from the latest complete checkpoint (or the start); returns the next round."""
        return Checkpoints.load(self.checkpoints.latest(), self.strategy, self.pools)

    def progress(self) -> dict:
        """What the round in flight is doing: {round, phase (start-up before the first round, start,
        train, valid, test, full valid, full test, checkpoint), done, total (clients or users; pools
        for a checkpoint)}."""
        return self._progress.snapshot()

    # -- reporting --------------------------------------------------------------------------

    def history_so_far(self) -> list[dict]:
        return self.strategy.history

    def stopped_early(self) -> bool:
        """The validation metric has not improved for more than train.patience evaluations."""
        return self.strategy.selection.should_stop()

    def summary(self) -> dict:
        return {**self.strategy.summary(), "recoveries": self.strategy.recoveries,
                "damaged_checkpoints": self.checkpoints.damaged, "pools": len(self.pools.shards),
                "peak_rss_gb": self._peak_rss_summary(), "users_per_pool": [len(s) for s in self.pools.shards],
                "machines": self.machines(), "server": self.server_info()}

    def server_info(self) -> dict:
        """Where the server's own model (GFMFR's group fusion model) trained: its device, or None."""
        groups = self.strategy.groups
        return {"device": None if groups is None else str(groups.device)}

    def _note_peaks(self, metrics: dict) -> None:
        for key, value in metrics.items():
            if key.startswith("mem/peak_rss_gb/"):
                name = key[len("mem/peak_rss_gb/"):]
                self.peak_rss[name] = max(value, self.peak_rss.get(name, 0.0))

    def _peak_rss_summary(self) -> dict[str, float]:
        """The highest peak resident memory (GB) of every pool and of the server, over this
        invocation's rounds and now (rounds restored from a checkpoint add theirs as recorded)."""
        for metrics in self.strategy.history:
            self._note_peaks(metrics)
        try:
            now = {f"pool-{i}": _gb(peak) for i, peak in enumerate(self.pools.peak_rss())}
        except PoolLost:  # a pool lost at the very end: what was recorded
            now = {}
        now["server"] = _gb(peak_rss_bytes())
        self._note_peaks({f"mem/peak_rss_gb/{k}": v for k, v in now.items() if v is not None})
        return dict(self.peak_rss)

    def machines(self) -> list[dict]:
        """The distinct machines (CPU model, kernels, threads, versions) the pools trained on."""
        found = []
        for info in self.pool_info():
            if info["machine"] not in found:
                found.append(info["machine"])
        return found

    def pool_info(self) -> list[dict]:
        return self.pools.info()

    def global_params(self) -> dict:
        return self.strategy.globals


def local_device(config: ExperimentConfig) -> str:
    """The device of the local backend's pools: the GPU this process sees where a Ray pool would
    take one (placement.plan_pools' rule: an ID backbone under runtime.device=auto, any model
    under cuda), else the CPU."""
    import torch

    visible = {"CPU": 1.0, "GPU": float(torch.cuda.device_count())}
    gpus = plan_pools(visible, config.runtime, fusion=config.model.fusion is not None).gpus_per_pool
    return training_device(config.runtime, gpus)


def pool_resources(cluster: dict[str, float], runtime) -> dict[str, float]:
    """The cluster's resources less the Server's own GPU share (runtime.server_gpus): what the
    pools are planned on."""
    if not runtime.server_gpus:
        return dict(cluster)
    return {**cluster, "GPU": max(0.0, float(cluster.get("GPU", 0.0)) - runtime.server_gpus)}


# the "progress" group answers progress() and report_progress() while a round runs in the default group
@ray.remote(num_cpus=0, max_restarts=0, concurrency_groups={"progress": 1})
class Server(RoundServer):
    """RoundServer as a Ray actor over ClientPool actors placed on the cluster (placement.plan_pools)."""

    def __init__(self, config_json: str, refs: list, run_dir: str):
        config = ExperimentConfig.model_validate_json(config_json)
        data_ref, negatives_ref = refs
        data = ray.get(data_ref)
        self.plan = plan_pools(pool_resources(ray.cluster_resources(), config.runtime), config.runtime,
                               fusion=config.model.fusion is not None)
        strategy = Strategy(config, data, n_pools=self.plan.pools)
        super().__init__(config, strategy, RayPools(config_json, data_ref, negatives_ref, strategy, self.plan), run_dir)

    def watch_progress(self) -> None:
        """From now on pools report the clients they have trained and the users they have
        evaluated, for progress(). Off until a driver shows a progress bar: without one, nobody
        reads the reports, so pools send none."""
        self.pools.report_to = ray.get_runtime_context().current_actor

    @ray.method(concurrency_group="progress")
    def report_progress(self, phase_id: int, pool: int, done: int) -> None:
        """A pool has done `done` of its share of phase `phase_id` (late reports are dropped)."""
        self._progress.report(phase_id, pool, done)

    @ray.method(concurrency_group="progress")
    def progress(self) -> dict:
        return super().progress()

    def server_info(self) -> dict:
        """As RoundServer's, with the GPUs Ray gave this actor (runtime.server_gpus)."""
        return {**super().server_info(), "gpu_ids": [str(i) for i in ray.get_gpu_ids()]}

    def pool_handles(self) -> list:
        return self.pools.actors
