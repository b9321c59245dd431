"""What runs a round's clients: the Pools interface, and its in-process implementation.

Pools hold the users (one pool per shard of users, with their personal state) and do the work
that needs that state: train a round's clients, sum their table changes per GFMFR group,
evaluate, save and load the state. LocalPools runs them in this process (tests, benchmarks, the
centralized path's checks); pool.RayPools runs each pool as a Ray actor. A round
(rounds.run_rounds) calls them the same way.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from pipeline.federated.messages import Upload


class PoolLost(RuntimeError):
    """A pool died or lost its state in the middle of a round (run_rounds recovers from the last
    checkpoint when it has one)."""


class Progress:
    """What the round in flight is doing: {round, phase, done, total}. Pools report what each has
    done of the current phase (clients trained, users ranked, files saved); reports of an earlier
    phase are dropped. Thread-safe: a Ray actor answers progress() while a round runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._id = 0
        self._phase = {"round": 0, "phase": "start-up", "done": 0, "total": 0}
        self._done: dict[int, int] = {}

    def begin(self, round_: int, phase: str, total: int) -> int:
        """A new phase of round `round_` over `total` clients, users or pools; returns its id."""
        with self._lock:
            self._id += 1
            self._phase = {"round": round_, "phase": phase, "done": 0, "total": int(total)}
            self._done = {}
            return self._id

    def report(self, phase_id: int, pool: int, done: int) -> None:
        """Pool `pool` has done `done` of its share of phase `phase_id`."""
        with self._lock:
            if phase_id == self._id:
                self._done[pool] = max(done, self._done.get(pool, 0))
                self._phase["done"] = sum(self._done.values())

    def counter(self, phase_id: int, pool: int) -> Callable[[int], None]:
        """A callback adding n to what pool `pool` has done of phase `phase_id`."""
        done = 0

        def add(n: int) -> None:
            nonlocal done
            done += n
            self.report(phase_id, pool, done)

        return add

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self._phase)


class Pools(Protocol):
    shards: list[np.ndarray]  # the users of every pool, sorted

    def train(self, round_: int, plan, users: list[np.ndarray], progress: Progress, phase: int) -> list[Upload]:
        """Train each pool's `users[i]` from `plan` (strategy.RoundPlan); one Upload per pool."""

    def group_sums(self, round_: int, ids: list[np.ndarray], n_groups: int) -> list:
        """GFMFR: each pool's per-group (sums, members) of its round clients' table changes."""

    def evaluate(self, global_params: dict, split: str, users: list[np.ndarray | None], progress: Progress,
                 phase: int, protocol: str | None = None) -> list[tuple[dict, int]]:
        """Each pool's (mean metrics, user count) on `split` for its users (None: all of them;
        ({}, 0) for a pool given no users) under `protocol` (None: train.protocol); the metrics
        hold covered@k, the items in its users' top-k lists, for the catalogue coverage of all
        pools together (Strategy.reduce)."""

    def save(self, folder: Path, round_: int, progress: Progress | None = None, phase: int = 0) -> list[tuple[int, str]]:
        """Write each pool's state to folder/pool-<i>.pt; (bytes, sha256) per pool."""

    def load(self, folder: Path | None, round_: int) -> None:
        """Restore every pool from folder/pool-<i>.pt (None: the initial state)."""

    def peak_rss(self) -> list[int | None]:
        """Each pool process's peak resident memory in bytes (None where unknown)."""


def save_state(store, path: Path) -> tuple[int, str]:
    """Write a pool's personal state atomically; (bytes, sha256)."""
    from pipeline.outputs import sha256_of

    tmp = Path(f"{path}.tmp")
    torch.save(store.state_dict(), tmp)
    os.replace(tmp, path)
    return path.stat().st_size, sha256_of(path)


def training_device(runtime, gpus: float) -> str:
    """The torch device of a pool holding `gpus` GPUs under runtime.device (see RuntimeConfig)."""
    wants_gpu = runtime.device == "cuda" or (runtime.device == "auto" and gpus > 0)
    if not wants_gpu:
        return "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError(f"runtime.device={runtime.device} with {gpus} GPU(s) per pool, but "
                           f"torch sees no CUDA device here (CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); set runtime.device=cpu")
    return "cuda"


class LocalPools:
    """Every pool as a Shard in this process, called one after the other."""

    def __init__(self, config, data, negatives, strategy, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        self.config, self.data, self.negatives = config, data, negatives
        self.initial, self.dtype, self.device = strategy.initial, dtype, device
        self.shards = strategy.shards
        self.pools = self._new_shards()

    def _new_shards(self) -> list:
        from pipeline.federated.engine.shard import Shard

        return [Shard(self.config, self.data, self.negatives, users, self.initial, dtype=self.dtype,
                      device=self.device) for users in self.shards]

    def train(self, round_, plan, users, progress, phase):
        return [pool.train(round_, plan.globals, mine, plan.lrs, plan.teacher, progress=progress.counter(phase, i))
                for i, (pool, mine) in enumerate(zip(self.pools, users))]

    def group_sums(self, round_, ids, n_groups):
        return [pool.group_sums(mine, n_groups) for pool, mine in zip(self.pools, ids)]

    def evaluate(self, global_params, split, users, progress, phase, protocol=None):
        from pipeline.eval.protocols import reporting_progress

        train = self.config.train
        out = []
        for i, (pool, mine) in enumerate(zip(self.pools, users)):
            if mine is not None and not len(mine):  # none of the sample's users is here
                out.append(({}, 0))
                continue
            with reporting_progress(progress.counter(phase, i)):
                out.append(pool.evaluate(global_params, protocol or train.protocol, split, train.eval_ks, mine,
                                         with_items=True))
        return out

    def save(self, folder, round_, progress=None, phase=0):
        saved = []
        for i, pool in enumerate(self.pools):
            saved.append(save_state(pool.store, Path(folder) / f"pool-{i}.pt"))
            if progress is not None:
                progress.report(phase, i, 1)
        return saved

    def load(self, folder, round_):
        if folder is None:
            self.pools = self._new_shards()
            return
        for i, pool in enumerate(self.pools):
            pool.store.load_state_dict(torch.load(Path(folder) / f"pool-{i}.pt", weights_only=False))

    def peak_rss(self):
        return [None] * len(self.pools)  # one process: the caller's own peak

    def info(self) -> list[dict]:
        from pipeline.federated.runtime.machine import describe

        return [{"node": "local", "pid": os.getpid(), "device": self.device, "users": len(pool.users),
                 "machine": describe(self.device)} for pool in self.pools]
