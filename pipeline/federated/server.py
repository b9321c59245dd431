"""The Server actor: global state, participants, aggregation, evaluation, selection,
checkpoints, and recovery when a pool dies. Ray wiring around pure functions of
aggregate.py and selection.py.

Checkpoint layout (one folder per round, renamed into place when complete):
  <run>/checkpoints/round-000007/{global.pt, pool-0.pt, ..., manifest.json}
  <run>/checkpoints/best/...   the same, at the best validation round so far
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import ray
import torch
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pipeline.config import ExperimentConfig
from pipeline.data.store import write_atomically
from pipeline.federated.aggregate import aggregate, feature_dims, initial_state, round_lrs, round_users, shard_users
from pipeline.federated.checkpoints import newest_intact, sha256_of
from pipeline.federated.group_server import GroupServer
from pipeline.federated.machine import peak_rss_bytes
from pipeline.federated.placement import plan_pools
from pipeline.federated.pool import ClientPool, StaleState
from pipeline.federated.privacy import privacy_report
from pipeline.federated.schedule import evaluates, eval_sample
from pipeline.federated.selection import Selection

KEEP_CHECKPOINTS = 2
BEST = "best"  # checkpoints/best: the state at the best validation round (runtime.keep_best)


def _nbytes(tensors: dict) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors.values()))


_POOL_DOWN = (RayActorError, ActorUnavailableError)
RESTART_WAIT_SECONDS = 120


def _is_pool_failure(error: Exception) -> bool:
    if isinstance(error, _POOL_DOWN):
        return True
    return isinstance(error, RayTaskError) and isinstance(error.cause, (StaleState, *_POOL_DOWN))


def _get_while_restarting(make_calls):
    """ray.get(make_calls()), retried while a pool is still being restarted by Ray
    (only for idempotent calls such as loading a checkpoint)."""
    deadline = time.monotonic() + RESTART_WAIT_SECONDS
    while True:
        try:
            return ray.get(make_calls())
        except _POOL_DOWN:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _pool_strategy():
    """Inside a placement group (a Ray Tune trial reserves one per trial, its pools included):
    the pools go into it; otherwise they spread over the cluster's nodes."""
    group = ray.util.get_current_placement_group()
    if group is None:
        return "SPREAD"
    return PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)


def _gb(nbytes: int | None) -> float | None:
    return None if nbytes is None else round(nbytes / 2 ** 30, 4)


# the "progress" group answers progress() and report_progress() while a round runs in the default group
@ray.remote(num_cpus=0, max_restarts=0, concurrency_groups={"progress": 1})
class Server:
    def __init__(self, config_json: str, refs: list, run_dir: str):
        self.config = ExperimentConfig.model_validate_json(config_json)
        data_ref, negatives_ref = refs
        data = ray.get(data_ref)
        self.n_users, self.n_items = data.n_users, data.n_items
        self.train_counts = np.asarray(data.train_counts)
        self.run_dir = Path(run_dir)
        self.initial = initial_state(self.config, self.n_users, self.n_items, feature_dims(data))
        self.globals = dict(self.initial.global_params)
        self.fusion_adam = None  # fusion_agg=grad_adam: the server's persistent Adam state
        self._data_features = {m: torch.as_tensor(np.asarray(x)) for m, x in data.features.items()}
        self.groups = self._new_groups()  # GFMFR's server state (None when off)
        runtime = self.config.runtime
        plan = plan_pools(ray.cluster_resources(), runtime, fusion=self.config.model.fusion is not None)
        self.plan = plan
        self.shards = shard_users(data.train_counts, plan.pools)
        initial_ref = ray.put(self.initial)
        # held for the run: Ray re-runs a pool's constructor with these after a crash
        self._pool_args = (data_ref, negatives_ref, initial_ref)
        self.pools = [
            ClientPool.options(num_cpus=plan.cpus_per_pool, num_gpus=plan.gpus_per_pool,
                               scheduling_strategy=_pool_strategy())
            .remote(config_json, data_ref, negatives_ref, users, initial_ref, plan.threads, plan.gpus_per_pool)
            for users in self.shards
        ]
        # train.eval_users: the fixed sample of every scheduled evaluation, per pool (None: every user)
        sample = eval_sample(self.config.train, self.n_users)
        self.eval_users = self.n_users if sample is None else len(sample)
        self.sample_per_pool = None if sample is None else [shard[np.isin(shard, sample)] for shard in self.shards]
        self.round = 0
        self.selection = Selection(self.config.train.selection(), self.config.train.patience)
        self.history: list[dict] = []
        self.recoveries = 0
        self.damaged_checkpoints: list[str] = []
        # what the round in flight is doing, for progress(): {round, phase, done, total}
        self._lock = threading.Lock()
        self._phase_id = 0
        self._phase = {"round": self.round, "phase": "start-up", "done": 0, "total": 0}
        self._done_per_pool: dict[int, int] = {}
        self._pools_report = False  # pools report users evaluated (watch_progress)
        self.peak_rss: dict[str, float] = {}  # GB per process (pool-<i>, server): the highest seen

    def _new_groups(self) -> GroupServer | None:
        if self.config.model.gfmfr is None:
            return None
        from pipeline.models import model_for

        return GroupServer(self.config, model_for(self.config.model), self.initial, self._data_features,
                           self.n_users, self.n_items)

    # -- one round --------------------------------------------------------------------------

    def run_round(self) -> dict:
        """Train, aggregate, evaluate and checkpoint round `self.round`; recover and redo it
        if a pool dies."""
        for attempt in range(3):
            try:
                metrics = self._round(self.round)
                break
            except Exception as error:  # noqa: BLE001 - only pool failures are recovered
                if not _is_pool_failure(error) or attempt == 2:
                    raise
                self._recover(self.round)
        self.round += 1
        return metrics

    def _round(self, round_: int) -> dict:
        started = time.perf_counter()
        split = round_users(self.config, self.train_counts, round_)
        users = split.arrived
        lrs = round_lrs(self.config, self.n_items, round_)
        global_ref = ray.put(self.globals)
        teacher = self.groups.download(round_) if self.groups is not None else None
        teacher_ref = ray.put(teacher)
        mine = [users[np.isin(users, shard)] for shard in self.shards]
        phase = self._begin(round_, "train", len(users))
        me = ray.get_runtime_context().current_actor if self._pools_report else None
        calls = [pool.train.remote(round_, global_ref, ids, lrs, teacher_ref, None if me is None else (me, phase, i))
                 for i, (pool, ids) in enumerate(zip(self.pools, mine))]
        uploads = self._gather(calls, [len(ids) for ids in mine])
        downloaded = self.globals
        self.globals, self.fusion_adam = aggregate(self.config, self.globals, uploads, self.fusion_adam, round_)
        train_seconds = time.perf_counter() - started
        group_metrics = self._group_step(round_, uploads, downloaded) if self.groups is not None else {}
        clients = sum(u.clients for u in uploads)
        metrics = {
            "round": round_,
            "train/loss": sum(u.loss_sum for u in uploads) / max(clients, 1),
            "train/clients": clients,
            "train/rows": sum(u.rows for u in uploads),
            "train/sampled": split.sampled,
            "train/dropped": len(split.dropped),
            "train/stragglers": len(split.late),
            "time/train_seconds": train_seconds,
            "time/clients_per_second": clients / train_seconds,
            "time/pool_seconds_max": max(u.seconds for u in uploads),
            "comm/bytes_down": _nbytes(self.globals) * len(self.pools),
            "comm/bytes_up": sum(u.nbytes() for u in uploads),
            "lr": self.config.lr() * self.config.lr_decay() ** round_,
            **group_metrics,
            **(self._privacy_metrics(round_, uploads) if self.config.privacy is not None else {}),
        }
        sampled = self.sample_per_pool is not None
        eval_started = time.perf_counter()
        if evaluates(self.config.train, round_):
            metrics.update(self._evaluate_splits(self.sample_per_pool))
            metrics["eval/users"], metrics["eval/sampled"] = self.eval_users, sampled
            # a sampled evaluation that improves the selection metric: this state on every user too,
            # so the selected round's valid and test are reported on every user
            full = self._evaluate_splits(None) if sampled and self.selection.improves(metrics) else None
            metrics["improved"] = self.selection.update(round_, metrics, full)
            if full is not None:
                metrics.update(self._full(full))
            if metrics["improved"] and self.config.runtime.keep_best:
                self._checkpoint(round_, name=BEST)
        metrics["stop"] = self.selection.should_stop() or round_ + 1 >= self.config.train.rounds
        if metrics["stop"] and sampled and "full/users" not in metrics:  # the final state on every user
            metrics.update(self._full(self._evaluate_splits(None)))
        # evaluation, the best-round checkpoint it may write included
        metrics["time/eval_seconds"] = time.perf_counter() - eval_started
        metrics.update(self._peak_rss_metrics())
        metrics["time/round_seconds"] = time.perf_counter() - started
        self.history.append(metrics)
        every = self.config.runtime.checkpoint_every
        if every and ((round_ + 1) % every == 0 or metrics["stop"]):
            checkpoint_started = time.perf_counter()
            self._checkpoint(round_)
            # after the write: the checkpoint's own copy of this row lacks it
            metrics["time/checkpoint_seconds"] = time.perf_counter() - checkpoint_started
        self._begin(round_ + 1, "start", 0)
        return metrics

    # -- progress within a round ------------------------------------------------------------

    def _begin(self, round_: int, phase: str, total: int) -> int:
        """A new phase of round `round_` over `total` clients or users; returns its id."""
        with self._lock:
            self._phase_id += 1
            self._phase = {"round": round_, "phase": phase, "done": 0, "total": int(total)}
            self._done_per_pool = {}
            return self._phase_id

    def watch_progress(self) -> None:
        """From now on pools report the clients they have trained and the users they have
        evaluated, for progress(). Off until a driver shows a progress bar: without one, nobody
        reads the reports, so pools send none."""
        self._pools_report = True

    @ray.method(concurrency_group="progress")
    def report_progress(self, phase_id: int, pool: int, done: int) -> None:
        """A pool has done `done` of its share of phase `phase_id` (late reports of an earlier phase
        are dropped)."""
        with self._lock:
            if phase_id == self._phase_id:
                self._done_per_pool[pool] = max(done, self._done_per_pool.get(pool, 0))
                self._phase["done"] = sum(self._done_per_pool.values())

    @ray.method(concurrency_group="progress")
    def progress(self) -> dict:
        """What the round in flight is doing: {round, phase (start-up before the first round, start,
        train, valid, test, full valid, full test, checkpoint), done, total (clients or users; pools
        for a checkpoint)}."""
        with self._lock:
            return dict(self._phase)

    def _gather(self, calls: list, sizes: list[int]) -> list:
        """ray.get(calls), counting each call's `sizes` entry done in the progress as it completes."""
        index = {ref: i for i, ref in enumerate(calls)}
        pending = list(calls)
        phase = self._phase_id
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                self.report_progress(phase, index[ref], sizes[index[ref]])
        return ray.get(calls)

    def _peak_rss_metrics(self) -> dict[str, float]:
        """mem/peak_rss_gb/<process>: the peak resident memory of every pool and of this server
        so far (Linux VmHWM; a restarted pool starts again from zero)."""
        peaks = {f"pool-{i}": _gb(peak) for i, peak in enumerate(ray.get([p.peak_rss.remote() for p in self.pools]))}
        peaks["server"] = _gb(peak_rss_bytes())
        for name, value in peaks.items():
            if value is not None:
                self.peak_rss[name] = max(value, self.peak_rss.get(name, 0.0))
        return {f"mem/peak_rss_gb/{name}": value for name, value in peaks.items() if value is not None}

    def _privacy_metrics(self, round_: int, uploads: list) -> dict:
        """(epsilon, delta) after this round (Opacus RDP; q = participation) and how many clients
        were clipped."""
        report = privacy_report(self.config.privacy, self.config.train.participation, round_ + 1)
        clients = sum(u.clients for u in uploads)
        return {"privacy/epsilon": report["epsilon"], "privacy/delta": report["delta"],
                "privacy/clipped_fraction": sum(u.clipped for u in uploads) / max(clients, 1)}

    def _group_step(self, round_: int, uploads: list, downloaded: dict) -> dict:
        """GFMFR's server step after aggregation (group_server.GroupServer.step); the pools reduce
        their members' tables per group where the members' state lives."""
        n_groups = self.config.model.gfmfr.group_num

        def reduce(ids: list[np.ndarray]) -> list:
            return ray.get([pool.group_sums.remote(round_, mine, n_groups) for pool, mine in zip(self.pools, ids)])

        return self.groups.step(round_, uploads, reduce, downloaded, self.globals)

    def _full(self, full: dict) -> dict:
        """An evaluation on every user as row keys: full/valid/<m>, full/test/<m>, full/users."""
        return {**{f"full/{k}": v for k, v in full.items()}, "full/users": self.n_users}

    def _evaluate_splits(self, users_per_pool: list | None) -> dict[str, float]:
        """valid/<m> and test/<m> on every user (None) or on each pool's users of the sample."""
        return {f"{split}/{name}": value for split in ("valid", "test")
                for name, value in self._evaluate(split, users_per_pool).items()}

    def _evaluate(self, split: str, users_per_pool: list | None = None) -> dict[str, float]:
        """Pools score their own users (or their users of `users_per_pool`); the means are reduced
        weighted by user counts."""
        train = self.config.train
        global_ref = ray.put(self.globals)
        mine = users_per_pool or [None] * len(self.pools)
        counts = [len(shard) if users is None else len(users) for shard, users in zip(self.shards, mine)]
        phase = self._begin(self._phase["round"], split if users_per_pool is not None or self.sample_per_pool is None
                            else f"full {split}", sum(counts))
        me = ray.get_runtime_context().current_actor if self._pools_report else None
        asked = [i for i, users in enumerate(mine) if users is None or len(users)]
        results = self._gather([self.pools[i].evaluate.remote(global_ref, train.protocol, split, train.eval_ks,
                                                              mine[i], None if me is None else (me, phase, i))
                                for i in asked],
                               [counts[i] for i in asked])
        results = [(m, count) for m, count in results if count]
        total = sum(count for _, count in results)
        return {name: sum(m[name] * count for m, count in results) / total for name in results[0][0]}

    # -- checkpoints and recovery -----------------------------------------------------------

    def _checkpoint(self, round_: int, name: str | None = None) -> None:
        """Write round `round_`'s checkpoint folder (round-NNNNNN, or `name`) atomically."""
        folder = self.run_dir / "checkpoints"

        def fill(tmp: Path) -> None:
            self._begin(round_, "checkpoint" if name is None else f"checkpoint {name}", len(self.pools))
            saved = self._gather([pool.save.remote(str(tmp / f"pool-{i}.pt"), round_)
                                  for i, pool in enumerate(self.pools)], [1] * len(self.pools))
            torch.save({"globals": self.globals, "selection": self.selection.state_dict(), "history": self.history,
                        "fusion_adam": self.fusion_adam,
                        "groups": self.groups.state_dict() if self.groups is not None else None}, tmp / "global.pt")
            digests = {f"pool-{i}.pt": digest for i, (_, digest) in enumerate(saved)}
            digests["global.pt"] = sha256_of(tmp / "global.pt")
            manifest = {"round": round_, "pools": len(self.pools), "pool_bytes": [size for size, _ in saved],
                        "users_per_pool": [len(s) for s in self.shards], "sha256": digests}
            (tmp / "manifest.json").write_text(json.dumps(manifest))

        write_atomically(folder / (name or f"round-{round_:06d}"), fill)
        for old in sorted(folder.glob("round-*"))[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)

    def latest_checkpoint(self) -> Path | None:
        """The newest intact checkpoint; newer damaged ones are skipped and reported in the summary
        (a damaged file is never loaded)."""
        folder, skipped = newest_intact(self.run_dir / "checkpoints")
        for path, reason in skipped:
            note = f"{path.name}: {reason}"
            if note not in self.damaged_checkpoints:
                self.damaged_checkpoints.append(note)
                print(f"checkpoint {path} skipped: {reason}", file=sys.stderr, flush=True)
        return folder

    def _load(self, checkpoint: Path | None) -> int:
        """Restore globals, selection, history and every pool; returns the next round."""
        if checkpoint is None:
            self.globals = dict(self.initial.global_params)
            self.fusion_adam = None
            self.groups = self._new_groups()
            self.selection = Selection(self.config.train.selection(), self.config.train.patience)
            self.history = []
            _get_while_restarting(lambda: [pool.load.remote(None, -1) for pool in self.pools])
            return 0
        manifest = json.loads((checkpoint / "manifest.json").read_text())
        if manifest["pools"] != len(self.pools):
            raise ValueError(f"{checkpoint} was written by {manifest['pools']} pools, this run has "
                             f"{len(self.pools)}: set runtime.pools={manifest['pools']} to resume it")
        state = torch.load(checkpoint / "global.pt", weights_only=False)
        self.globals, self.history = state["globals"], state["history"]
        self.fusion_adam = state.get("fusion_adam")
        self.groups = self._new_groups()
        if self.groups is not None:
            self.groups.load_state_dict(state["groups"])
        self.selection.load_state_dict(state["selection"])
        self.selection.patience = self.config.train.patience  # a resume may change the patience
        round_ = manifest["round"]
        _get_while_restarting(lambda: [pool.load.remote(str(checkpoint / f"pool-{i}.pt"), round_)
                                       for i, pool in enumerate(self.pools)])
        return round_ + 1

    def resume(self) -> int:
        """Continue from the latest complete checkpoint (or the start); returns the next round."""
        self.round = self._load(self.latest_checkpoint())
        return self.round

    def _recover(self, failed_round: int) -> None:
        """A pool died in `failed_round`: restore the last checkpoint and replay up to it."""
        self.recoveries += 1
        next_round = self._load(self.latest_checkpoint())
        for round_ in range(next_round, failed_round):
            self._round(round_)

    # -- reporting --------------------------------------------------------------------------

    def history_so_far(self) -> list[dict]:
        return self.history

    def stopped_early(self) -> bool:
        """The validation metric has not improved for more than train.patience evaluations."""
        return self.selection.should_stop()

    def summary(self) -> dict:
        privacy = self.config.privacy
        if privacy is not None:
            privacy = privacy_report(privacy, self.config.train.participation, len(self.history))
        train = self.config.train
        evaluation = {"every": train.eval_every, "round0": train.eval_round0, "users": self.eval_users,
                      "sampled": self.sample_per_pool is not None, "seed": train.eval_seed,
                      "final": self._final()}
        return {"selection": self.selection.report(), "evaluation": evaluation,
                "rounds_run": len(self.history), "privacy": privacy,
                "recoveries": self.recoveries, "damaged_checkpoints": self.damaged_checkpoints, "pools": len(self.pools),
                "peak_rss_gb": self._peak_rss_summary(),
                "users_per_pool": [len(s) for s in self.shards], "machines": self.machines()}

    def _peak_rss_summary(self) -> dict[str, float]:
        """The highest peak resident memory (GB) of every pool and of the server, over this
        invocation's rounds and now (rounds restored from a checkpoint add theirs as recorded)."""
        peaks = dict(self.peak_rss)
        for metrics in self.history:
            for key, value in metrics.items():
                if key.startswith("mem/peak_rss_gb/"):
                    name = key[len("mem/peak_rss_gb/"):]
                    peaks[name] = max(value, peaks.get(name, 0.0))
        try:
            self._peak_rss_metrics()
            peaks.update({k: max(v, peaks.get(k, 0.0)) for k, v in self.peak_rss.items()})
        except _POOL_DOWN:  # a pool lost at the very end: what was recorded
            pass
        return peaks

    def _final(self) -> dict | None:
        """The last round's state on every user: its full/ evaluation under a sample, else its
        scheduled evaluation when the last round had one (None otherwise)."""
        if not self.history:
            return None
        last = self.history[-1]
        prefix = "full/" if "full/users" in last else ""
        if f"{prefix}valid/{self.selection.metric}" not in last or (not prefix and last.get("eval/sampled")):
            return None
        pick = lambda split: {k[len(prefix) + len(split) + 1:]: v for k, v in last.items()  # noqa: E731
                              if k.startswith(f"{prefix}{split}/")}
        return {"round": last["round"], "users": self.n_users, "valid": pick("valid"), "test": pick("test")}

    def machines(self) -> list[dict]:
        """The distinct machines (CPU model, kernels, threads, versions) the pools trained on."""
        found = []
        for info in self.pool_info():
            if info["machine"] not in found:
                found.append(info["machine"])
        return found

    def pool_info(self) -> list[dict]:
        return ray.get([pool.info.remote() for pool in self.pools])

    def pool_handles(self) -> list:
        return self.pools

    def global_params(self) -> dict:
        return self.globals
