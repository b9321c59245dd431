"""Centralized training of a PooledModel: epochs over every user's rows, evaluation, selection.

Pure PyTorch (torch.distributed when a process group is up; no Ray): the Ray Train worker loop
(job.py) drives it. Data parallelism is exact up to float summation order: every worker builds
the same epoch (positives + fresh negatives by the federated engine's own sampler, then one
seeded shuffle of all rows), cuts it into the same global batches, and takes an even slice of
each; its loss is scaled so that the gradient average over the workers is the gradient of the mean
loss over the global batch, and dropout masks are keyed by row. So N workers follow the 1-worker trajectory
(except under FedMR's mixing_source=batch, which mixes over the rows of a forward call: there a
worker's slice is the batch).

Shapes: R = rows of an epoch (positives x (1 + neg_ratio)), U users, I items.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.distributed as dist

from pipeline.centralized.model import PooledModel
from pipeline.config import ExperimentConfig
from pipeline.eval.protocols import evaluate, new_covered
from pipeline.federated.engine.sampling import client_data, epoch_rows
from pipeline.federated.strategy.selection import Selection

_POOL_SHUFFLE_TAG = 0xCE47  # separates the pooled shuffle from the federated streams


def epoch_batches(clients, *, neg_ratio: int, batch_rows: int, seed: int, epoch: int, world: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """(user [R], item [R], label [R] float32, global batch bounds [(start, stop)]) of one epoch:
    the federated negatives rule for every user, one shuffle of all rows by (seed, epoch). A last
    batch under half a batch joins the one before it; the bounds never depend on `world`, which
    only has to leave every worker a row of every batch."""
    rows = epoch_rows(clients, neg_ratio=neg_ratio, rows_per_batch=max(1, len(clients.pos_items)),
                      seed=seed, round_=epoch, epoch=0)
    order = np.random.default_rng([seed, epoch, _POOL_SHUFFLE_TAG]).permutation(len(rows.item))
    user = clients.users[rows.client[order]]
    n = len(order)
    bounds = [(start, min(start + batch_rows, n)) for start in range(0, n, batch_rows)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < batch_rows / 2:
        bounds[-2:] = [(bounds[-2][0], n)]
    smallest = min(stop - start for start, stop in bounds)
    if smallest < world:
        raise ValueError(f"a global batch of {smallest} rows cannot give each of {world} workers a row: "
                         f"raise centralized.batch_size or use fewer workers")
    return user, rows.item[order], rows.label[order], bounds


def worker_slice(start: int, stop: int, rank: int, world: int) -> tuple[int, int]:
    """This worker's even, contiguous share of the global batch [start, stop)."""
    size = stop - start
    return start + size * rank // world, start + size * (rank + 1) // world


def _all_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
    return values


class CentralizedTrainer:
    """One worker's share of centralized training. wrap: what moves the model to its device (Ray
    Train's prepare_model); with world > 1 the gradients are averaged over the process group
    after every backward pass (_average_gradients)."""

    def __init__(self, config: ExperimentConfig, data, negatives, *, rank: int = 0, world: int = 1,
                 device: torch.device | str = "cpu", wrap=None):
        self.config, self.data, self.negatives = config, data, negatives
        self.rank, self.world = rank, world
        self.device = torch.device(device)
        dtype = torch.float64 if config.centralized.dtype == "float64" else torch.float32
        self.pooled = PooledModel(config, data, dtype=dtype).to(self.device)
        self.net = wrap(self.pooled) if wrap is not None else self.pooled
        central = config.centralized
        self.dense_optimizer = torch.optim.Adam(self.pooled.dense_parameters(), lr=central.lr,
                                                weight_decay=central.weight_decay)
        sparse = self.pooled.sparse_parameters()
        self.sparse_optimizer = torch.optim.SparseAdam(sparse, lr=central.lr) if sparse else None
        train = config.train
        self.clients = client_data(data, np.arange(data.n_users), neg_pool=train.neg_pool,
                                   neg_exclude_heldout=train.neg_exclude_heldout)
        self.batch_rows = central.batch_size * (1 + train.neg_ratio)
        self.selection = Selection(train.selection(), central.patience)
        self.epoch = 0
        self.history: list[dict] = []
        self.best_model: dict | None = None
        users = np.arange(data.n_users)
        self.eval_users = users[rank::world]  # this worker's share of the evaluation

    def done(self) -> bool:
        return self.epoch >= self.config.centralized.epochs or self.selection.should_stop()

    def train_epoch(self) -> dict[str, float]:
        """One epoch; {'train/loss': mean row loss over the whole epoch (all workers), 'train/rows'}."""
        train = self.config.train
        user, item, label, bounds = epoch_batches(self.clients, neg_ratio=train.neg_ratio,
                                                  batch_rows=self.batch_rows, seed=train.seed,
                                                  epoch=self.epoch, world=self.world)
        self.net.train()
        loss_sum = 0.0
        for step, (start, stop) in enumerate(bounds):
            lo, hi = worker_slice(start, stop, self.rank, self.world)
            as_tensor = lambda x, dtype=None: torch.as_tensor(x[lo:hi], dtype=dtype, device=self.device)  # noqa: E731
            summed = self.net(as_tensor(user), as_tensor(item), as_tensor(label, torch.float32),
                              self.epoch, step, train.seed)
            # the workers' gradients are averaged: x world / global rows makes it the global mean
            loss = summed * (self.world / (stop - start))
            self.dense_optimizer.zero_grad(set_to_none=True)
            if self.sparse_optimizer is not None:
                self.sparse_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._average_gradients()
            self.dense_optimizer.step()
            if self.sparse_optimizer is not None:
                self.sparse_optimizer.step()
            loss_sum += float(summed.detach())
        total = float(_all_sum(torch.tensor([loss_sum], dtype=torch.float64))[0])
        return {"train/loss": total / len(user), "train/rows": float(len(user))}

    def _average_gradients(self) -> None:
        """Every worker's gradients summed over the workers, / world: the gradient of the global
        batch. Dense gradients as one flat all-reduce; the per-user tables' sparse gradients
        (rows of this step's users) through the backend's sparse all-reduce (gloo)."""
        if self.world == 1 or not (dist.is_available() and dist.is_initialized()):
            return
        dense = [p for p in self.pooled.dense_parameters() if p.grad is not None]
        if dense:
            flat = torch.cat([p.grad.reshape(-1) for p in dense])
            dist.all_reduce(flat)
            flat /= self.world
            offset = 0
            for p in dense:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        for p in self.pooled.sparse_parameters():
            if p.grad is not None:
                grad = p.grad.coalesce()
                dist.all_reduce(grad)
                p.grad = grad.coalesce() / self.world

    def evaluate(self) -> dict[str, float]:
        """valid/<metric> and test/<metric> over all users: each worker scores its share, the
        per-user sums are added up across workers, and catalogue coverage@k is of the union of
        the workers' top-k items."""
        self.net.eval()
        mine = self.eval_users
        scores = self.pooled.scores(torch.as_tensor(mine))
        position = np.full(self.data.n_users, -1, dtype=np.int64)
        position[mine] = np.arange(len(mine))
        scorer = lambda batch: scores[torch.as_tensor(position[batch.numpy()])]  # noqa: E731
        train = self.config.train
        names, sums, covered = [], [], {}
        for split in ("valid", "test"):
            covered[split] = new_covered(self.data.n_items, train.eval_ks)
            if len(mine):
                result = evaluate(scorer, self.data, train.protocol, split, self.negatives, ks=train.eval_ks, users=mine,
                                  covered=covered[split])
            else:  # more workers than users: this one adds nothing
                result = {f"{m}@{k}": 0.0 for k in train.eval_ks for m in ("hr", "ndcg", "mrr")}
            for name, value in sorted(result.items()):
                if not name.startswith("coverage@"):  # a union, not a sum: below
                    names.append(f"{split}/{name}")
                    sums.append(value * len(mine))
        totals = _all_sum(torch.tensor(sums, dtype=torch.float64)) / self.data.n_users
        out = {name: float(value) for name, value in zip(names, totals)}
        for split, items in covered.items():
            union = _all_sum(torch.stack([items[k] for k in train.eval_ks]).to(torch.float64)) > 0
            out.update({f"{split}/coverage@{k}": float(union[i].to(torch.float64).mean())
                        for i, k in enumerate(train.eval_ks)})
        return out

    def run_epoch(self) -> dict:
        """Train one epoch, evaluate, select; the epoch's metrics (what a worker reports)."""
        started = time.perf_counter()
        metrics = {"epoch": self.epoch, **self.train_epoch()}
        trained = time.perf_counter()
        metrics.update(self.evaluate())
        improved = self.selection.update(self.epoch, metrics)
        if improved:
            self.best_model = copy.deepcopy(self.pooled.state_dict())
        self.epoch += 1
        metrics.update({"time/epoch_seconds": time.perf_counter() - started,
                        "time/train_seconds": trained - started, "improved": improved, "stop": self.done()})
        self.history.append(metrics)
        return metrics

    def state_dict(self) -> dict:
        return {"model": self.pooled.state_dict(), "best_model": self.best_model,
                "dense_optimizer": self.dense_optimizer.state_dict(),
                "sparse_optimizer": self.sparse_optimizer.state_dict() if self.sparse_optimizer else None,
                "selection": self.selection.state_dict(), "epoch": self.epoch, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.pooled.load_state_dict(state["model"])
        self.best_model = state["best_model"]
        self.dense_optimizer.load_state_dict(state["dense_optimizer"])
        if self.sparse_optimizer is not None:
            self.sparse_optimizer.load_state_dict(state["sparse_optimizer"])
        self.selection.load_state_dict(state["selection"])
        self.epoch, self.history = state["epoch"], list(state["history"])
