"""ClientPool: a Ray actor that owns a shard of users (their private state) and trains all of
its sampled users in one call. Ray wiring only; the math is in shard.py / client.py.

A pool is restartable: after a crash Ray re-creates it with its initial state, and the pool's
`state_round` tells the server that its state is not the one the round expects.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import ray
import torch

from pipeline.config import ExperimentConfig
from pipeline.federated.machine import describe, peak_rss_bytes

PROGRESS_SECONDS = 0.5  # at most two progress reports a second per pool


class StaleState(RuntimeError):
    """The pool's state is not at the round the server expects (it was restarted)."""


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
        from pipeline.federated.shard import Shard

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
            return self.shard.evaluate(global_params, protocol, split, ks, users)
        from pipeline.eval.protocols import reporting_progress

        with reporting_progress(_reporter(*progress)):
            return self.shard.evaluate(global_params, protocol, split, ks, users)

    def peak_rss(self) -> int | None:
        """This pool process's peak resident set size in bytes (VmHWM; None off Linux)."""
        return peak_rss_bytes()

    def scores(self, global_params: dict, users: np.ndarray) -> torch.Tensor:
        return self.shard.scores(global_params, torch.as_tensor(users))

    def save(self, path: str, round_: int) -> tuple[int, str]:
        """Write this shard's private state for checkpoint `round_` atomically; returns (bytes,
        sha256 of the file)."""
        from pipeline.federated.checkpoints import sha256_of

        self._expect(round_)
        tmp = f"{path}.tmp"
        torch.save(self.shard.store.state_dict(), tmp)
        os.replace(tmp, path)
        return Path(path).stat().st_size, sha256_of(Path(path))

    def load(self, path: str | None, round_: int) -> None:
        """Restore the state of checkpoint `round_` (None: the initial state, round -1)."""
        from pipeline.federated.shard import Shard

        if path is None:
            data, negatives, users, initial = self._args
            self.shard = Shard(self.config, data, negatives, users, initial, device=self.device)
        else:
            self.shard.store.load_state_dict(torch.load(path, weights_only=False))
        self.state_round = round_

    def info(self) -> dict:
        return {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "device": self.device,
                "users": len(self.shard.users), "state_round": self.state_round, "machine": describe(self.device)}
