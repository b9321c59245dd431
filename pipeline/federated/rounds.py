"""The round loop: a Strategy's rounds played against any Pools (in this process or Ray actors).

    plan    = strategy.configure(t)                   who trains, from what
    uploads = pools.train(t, plan)                    clients train where their state lives
    metrics = strategy.aggregate(plan, uploads)       the new global parameters
              strategy.group_step(plan, uploads, ..)  GFMFR: groups and the group fusion model
    evaluation when scheduled, model selection, the best round's checkpoint
    stop?   and the round's checkpoint

Every caller plays rounds through run_rounds: the job (the Server actor), a Tune trial (through
the job), the equivalence tests and the benchmarks.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pipeline.federated.backend import PoolLost, Pools, Progress
from pipeline.federated.runtime.checkpoints import BEST, Checkpoints
from pipeline.federated.runtime.machine import peak_rss_bytes
from pipeline.federated.strategy import Strategy

ATTEMPTS = 3  # a round whose pool dies is redone from the last checkpoint, at most this often


def run_rounds(strategy: Strategy, pools: Pools, *, rounds: int | None = None, checkpoints: Checkpoints | None = None,
               progress: Progress | None = None, on_round: Callable[[dict], None] | None = None) -> list[dict]:
    """Play rounds from strategy.next_round until the run stops (patience or train.rounds), or
    `rounds` of them; returns their metrics. checkpoints: where the rounds' checkpoints go
    (runtime.checkpoint_every, runtime.keep_best) and where a round that loses a pool recovers
    from. on_round: called with each round's metrics."""
    progress = progress or Progress()
    played = []
    while not strategy.finished() and (rounds is None or len(played) < rounds):
        round_ = strategy.next_round
        for attempt in range(ATTEMPTS):
            try:
                metrics = play_round(strategy, pools, round_, checkpoints, progress)
                break
            except PoolLost:
                if checkpoints is None or attempt == ATTEMPTS - 1:
                    raise
                recover(strategy, pools, checkpoints, progress, round_)
        played.append(metrics)
        if on_round is not None:
            on_round(metrics)
    return played


def play_round(strategy: Strategy, pools: Pools, round_: int, checkpoints: Checkpoints | None,
               progress: Progress) -> dict:
    """Train, aggregate, evaluate and checkpoint round `round_`; its metrics."""
    started = time.perf_counter()
    plan = strategy.configure(round_)
    phase = progress.begin(round_, "train", len(plan.users))
    uploads = pools.train(round_, plan, strategy.users_per_pool(plan.users), progress, phase)
    metrics = strategy.aggregate(plan, uploads)
    metrics["time/train_seconds"] = train_seconds = time.perf_counter() - started
    metrics["time/clients_per_second"] = metrics["train/clients"] / train_seconds
    if strategy.groups is not None:
        metrics.update(strategy.group_step(plan, uploads, lambda ids: pools.group_sums(round_, ids, strategy.n_groups)))

    eval_started = time.perf_counter()
    sampled = strategy.sample_per_pool is not None
    if strategy.evaluates(round_):
        metrics.update(_evaluate(strategy, pools, progress, round_, strategy.sample_per_pool))
        metrics["eval/users"], metrics["eval/sampled"] = strategy.eval_users, sampled
        for other in strategy.config.train.also_protocols:  # every user (a sampled schedule is refused)
            also = _evaluate(strategy, pools, progress, round_, None, other)
            metrics.update({f"{other}/{key}": value for key, value in also.items()})
        # a sampled evaluation that improves the selection metric: this state on every user too,
        # so the selected round's valid and test are reported on every user
        full = _evaluate(strategy, pools, progress, round_, None) if sampled and strategy.improves(metrics) else None
        metrics["improved"] = strategy.select(round_, metrics, full)
        if full is not None:
            metrics.update(_full(full, strategy.n_users))
        if metrics["improved"] and checkpoints is not None and strategy.config.runtime.keep_best:
            checkpoints.save(round_, strategy, pools, name=BEST, progress=progress)
    metrics["stop"] = strategy.stops(round_)
    if metrics["stop"] and sampled and "full/users" not in metrics:  # the final state on every user
        metrics.update(_full(_evaluate(strategy, pools, progress, round_, None), strategy.n_users))
    metrics["time/eval_seconds"] = time.perf_counter() - eval_started  # the best round's checkpoint included
    metrics.update(_peak_rss(pools))
    metrics["time/round_seconds"] = time.perf_counter() - started
    strategy.finish(metrics)

    every = strategy.config.runtime.checkpoint_every
    if checkpoints is not None and every and ((round_ + 1) % every == 0 or metrics["stop"]):
        checkpoint_started = time.perf_counter()
        checkpoints.save(round_, strategy, pools, progress=progress)
        metrics["time/checkpoint_seconds"] = time.perf_counter() - checkpoint_started  # the checkpoint's copy lacks it
    progress.begin(round_ + 1, "start", 0)
    return metrics


def recover(strategy: Strategy, pools: Pools, checkpoints: Checkpoints, progress: Progress, failed_round: int) -> None:
    """A pool died in `failed_round`: restore the last checkpoint and replay the rounds up to it."""
    strategy.recoveries += 1
    for round_ in range(Checkpoints.load(checkpoints.latest(), strategy, pools), failed_round):
        play_round(strategy, pools, round_, checkpoints, progress)


def _evaluate(strategy: Strategy, pools: Pools, progress: Progress, round_: int, users_per_pool: list | None,
              protocol: str | None = None) -> dict:
    """valid/<m> and test/<m> on every user (None) or on each pool's users of the sample, under
    train.protocol, or under `protocol` (one of train.also_protocols)."""
    mine = users_per_pool or [None] * len(pools.shards)
    users = sum(len(shard) if ids is None else len(ids) for shard, ids in zip(pools.shards, mine))
    out = {}
    for split in ("valid", "test"):
        name = split if users_per_pool is not None or strategy.sample_per_pool is None else f"full {split}"
        phase = progress.begin(round_, name if protocol is None else f"{protocol} {split}", users)
        results = pools.evaluate(strategy.globals, split, mine, progress, phase, protocol=protocol)
        out.update({f"{split}/{metric}": value for metric, value in strategy.reduce(results).items()})
    return out


def _full(full: dict, n_users: int) -> dict:
    """An evaluation on every user as row keys: full/valid/<m>, full/test/<m>, full/users."""
    return {**{f"full/{k}": v for k, v in full.items()}, "full/users": n_users}


def _peak_rss(pools: Pools) -> dict[str, float]:
    """mem/peak_rss_gb/<process>: the peak resident memory of every pool and of this process so
    far (Linux VmHWM; a restarted pool starts again from zero; in-process pools are this process)."""
    peaks = {f"pool-{i}": peak for i, peak in enumerate(pools.peak_rss())}
    peaks["server"] = peak_rss_bytes()
    return {f"mem/peak_rss_gb/{name}": round(peak / 2 ** 30, 4) for name, peak in peaks.items() if peak is not None}


def in_process(config, data, negatives=None, *, n_pools: int = 1, dtype=None, device: str | None = None):
    """A Strategy and LocalPools for `data` in this process (tests, benchmarks): run_rounds plays
    them exactly as the job plays its Ray pools. dtype: of the pools' state and the global
    parameters (None: float32). device: of the pools' state and local training (None:
    config.runtime.device, as a Ray pool holding no GPU reads it: auto is the CPU, cuda without a
    visible GPU an error)."""
    import torch

    from pipeline.federated.backend import LocalPools, training_device

    if device is None:
        device = training_device(config.runtime, 0.0)

    strategy = Strategy(config, data, n_pools=n_pools, dtype=dtype)
    return strategy, LocalPools(config, data, negatives, strategy, dtype=dtype or torch.float32, device=device)
