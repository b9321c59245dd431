"""ClientPool: a Ray actor that owns a shard of users (their private state) and trains all of
its sampled users in one call; RayPools: the backend.Pools of a run, one ClientPool per shard.
Ray wiring only; the math is in shard.py / client.py.

A pool is restartable: after a crash Ray re-creates it with its initial state, and the pool's
`state_round` tells the server that its state is not the one the round expects (RayPools raises
backend.PoolLost for either, and the round loop recovers from the last checkpoint).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import ray
import torch
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pipeline.config import ExperimentConfig
from pipeline.federated.backend import PoolLost, save_state, training_device
from pipeline.federated.runtime.machine import describe, peak_rss_bytes

PROGRESS_SECONDS = 0.5  # at most two progress reports a second per pool


class StaleState(RuntimeError):
    """The pool's state is not at the round the server expects (it was restarted)."""


def _reporter(server, phase: int, index: int) -> Callable[[int], None]:
    """A callback that counts what pool `index` has done of phase `phase` (clients trained, users
    ranked) and reports the running total to the server actor at most every PROGRESS_SECONDS."""
    done, last = 0, time.monotonic()

    def report(n: int) -> None:
        nonlocal done, last
        done += n
        if time.monotonic() - last >= PROGRESS_SECONDS:
            last = time.monotonic()
            server.report_progress.remote(phase, index, done)  # fire and forget

    return report


@ray.remote(max_restarts=-1, max_task_retries=0)
class ClientPool:
    def __init__(self, config_json: str, data, negatives, users: np.ndarray, initial, threads: int,
                 gpus: float = 0.0):
        from pipeline.federated.engine.shard import Shard

        torch.set_num_threads(max(1, threads))
        self.config = ExperimentConfig.model_validate_json(config_json)
        self._args = (data, negatives, np.asarray(users), initial)
        self.device = training_device(self.config.runtime, gpus)
        self.shard = Shard(self.config, data, negatives, np.asarray(users), initial, device=self.device)
        self.state_round = -1  # rounds of training reflected in the state (-1: initial)

    def _expect(self, round_: int) -> None:
        if self.state_round != round_:
            raise StaleState(f"pool state is at round {self.state_round}, expected {round_}")

    def train(self, round_: int, global_params: dict, users: np.ndarray, lrs: dict, teacher=None,
              progress: tuple | None = None):
        """Train `users` in round `round_` from global_params (GFMFR: distilling `teacher`);
        returns the reduced Upload. progress: as for evaluate, counting clients trained."""
        self._expect(round_ - 1)
        upload = self.shard.train(round_, global_params, users, lrs, teacher,
                                  progress=None if progress is None else _reporter(*progress))
        self.state_round = round_
        return upload

    def group_sums(self, round_: int, ids: np.ndarray, n_groups: int):
        """GFMFR: the per-group sums of round `round_`'s clients' table changes (Shard.group_sums)."""
        self._expect(round_)
        return self.shard.group_sums(ids, n_groups)

    def evaluate(self, global_params: dict, protocol: str, split: str, ks: tuple[int, ...],
                 users: np.ndarray | None = None, progress: tuple | None = None):
        """Mean metrics over this pool's users (or `users`) and their count. progress: (the server
        actor, phase, pool index): the users ranked so far are reported to the server's
        report_progress as the evaluator goes (throttled; what the progress bar shows)."""
        if progress is None:
            return self.shard.evaluate(global_params, protocol, split, ks, users, with_items=True)
        from pipeline.eval.protocols import reporting_progress

        with reporting_progress(_reporter(*progress)):
            return self.shard.evaluate(global_params, protocol, split, ks, users, with_items=True)

    def peak_rss(self) -> int | None:
        """This pool process's peak resident set size in bytes (VmHWM; None off Linux)."""
        return peak_rss_bytes()

    def scores(self, global_params: dict, users: np.ndarray) -> torch.Tensor:
        return self.shard.scores(global_params, torch.as_tensor(users))

    def save(self, path: str, round_: int) -> tuple[int, str]:
        """Write this shard's private state for checkpoint `round_` atomically; returns (bytes,
        sha256 of the file)."""
        self._expect(round_)
        return save_state(self.shard.store, Path(path))

    def load(self, path: str | None, round_: int) -> None:
        """Restore the state of checkpoint `round_` (None: the initial state, round -1)."""
        from pipeline.federated.engine.shard import Shard

        if path is None:
            data, negatives, users, initial = self._args
            self.shard = Shard(self.config, data, negatives, users, initial, device=self.device)
        else:
            self.shard.store.load_state_dict(torch.load(path, weights_only=False))
        self.state_round = round_

    def info(self) -> dict:
        return {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "device": self.device,
                "users": len(self.shard.users), "state_round": self.state_round, "machine": describe(self.device)}


_POOL_DOWN = (RayActorError, ActorUnavailableError)
RESTART_WAIT_SECONDS = 120


def _is_pool_failure(error: Exception) -> bool:
    if isinstance(error, _POOL_DOWN):
        return True
    return isinstance(error, RayTaskError) and isinstance(error.cause, (StaleState, *_POOL_DOWN))


def _placement():
    """Inside a placement group (a Ray Tune trial reserves one per trial, its pools included):
    the pools go into it; otherwise they spread over the cluster's nodes."""
    group = ray.util.get_current_placement_group()
    if group is None:
        return "SPREAD"
    return PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)


class RayPools:
    """backend.Pools as ClientPool actors placed by placement.plan_pools. A pool that dies or
    comes back restarted raises backend.PoolLost from the call that finds it."""

    def __init__(self, config_json: str, data_ref, negatives_ref, strategy, plan):
        self.shards = strategy.shards
        initial_ref = ray.put(strategy.initial)
        # held for the run: Ray re-runs a pool's constructor with these after a crash, and a
        # reference nobody holds is freed once the first constructors have run
        self._constructor_args = (data_ref, negatives_ref, initial_ref)
        self.actors = [
            ClientPool.options(num_cpus=plan.cpus_per_pool, num_gpus=plan.gpus_per_pool, scheduling_strategy=_placement())
            .remote(config_json, data_ref, negatives_ref, users, initial_ref, plan.threads, plan.gpus_per_pool)
            for users in self.shards
        ]
        self.config = strategy.config
        self.report_to = None  # the actor whose report_progress the pools call while they work (None: none)

    def _reports(self, phase: int, index: int):
        return None if self.report_to is None else (self.report_to, phase, index)

    @staticmethod
    def _gather(calls: list, sizes: list[int] | None = None, progress=None, phase: int = 0) -> list:
        """ray.get(calls); each call's `sizes` entry counts as done in `progress` when it completes.
        A lost pool raises PoolLost."""
        try:
            if progress is not None:
                index = {ref: i for i, ref in enumerate(calls)}
                pending = list(calls)
                while pending:
                    ready, pending = ray.wait(pending, num_returns=1)
                    for ref in ready:
                        progress.report(phase, index[ref], sizes[index[ref]])
            return ray.get(calls)
        except Exception as error:  # noqa: BLE001 - only pool failures are translated
            if _is_pool_failure(error):
                raise PoolLost(str(error)) from error
            raise

    def train(self, round_, plan, users, progress, phase):
        global_ref, teacher_ref = ray.put(plan.globals), ray.put(plan.teacher)
        calls = [actor.train.remote(round_, global_ref, ids, plan.lrs, teacher_ref, self._reports(phase, i))
                 for i, (actor, ids) in enumerate(zip(self.actors, users))]
        return self._gather(calls, [len(ids) for ids in users], progress, phase)

    def group_sums(self, round_, ids, n_groups):
        return self._gather([actor.group_sums.remote(round_, mine, n_groups) for actor, mine in zip(self.actors, ids)])

    def evaluate(self, global_params, split, users, progress, phase, protocol=None):
        train = self.config.train
        global_ref = ray.put(global_params)
        asked = [i for i, ids in enumerate(users) if ids is None or len(ids)]
        counts = [len(self.shards[i]) if users[i] is None else len(users[i]) for i in asked]
        protocol = protocol or train.protocol
        results = self._gather([self.actors[i].evaluate.remote(global_ref, protocol, split, train.eval_ks,
                                                               users[i], self._reports(phase, i)) for i in asked],
                               counts, progress, phase)
        out = [({}, 0)] * len(self.actors)
        for i, result in zip(asked, results):
            out[i] = result
        return out

    def save(self, folder, round_, progress=None, phase=0):
        return self._gather([actor.save.remote(str(Path(folder) / f"pool-{i}.pt"), round_)
                             for i, actor in enumerate(self.actors)], [1] * len(self.actors), progress, phase)

    def load(self, folder, round_):
        """Idempotent, so retried while Ray is still restarting a pool."""
        paths = [None if folder is None else str(Path(folder) / f"pool-{i}.pt") for i in range(len(self.actors))]
        deadline = time.monotonic() + RESTART_WAIT_SECONDS
        while True:
            try:
                ray.get([actor.load.remote(path, round_) for actor, path in zip(self.actors, paths)])
                return
            except _POOL_DOWN:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def peak_rss(self):
        return self._gather([actor.peak_rss.remote() for actor in self.actors])

    def info(self) -> list[dict]:
        return ray.get([actor.info.remote() for actor in self.actors])
