"""A shard of users: their private state, their local training, their evaluation.

This is the whole job of a ClientPool, without Ray: the actor only wraps it. Uploads are
reduced over the shard's clients (weighted sums of deltas and the weight total), so a pool
sends O(touched rows) per round, not one message per client.

Shapes: B = clients trained now, W = working-set rows, K = distinct items touched, I, d.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.config import ExperimentConfig
from pipeline.data.negatives import EvalNegatives
from pipeline.data.prepare import PreparedDataset
from pipeline.eval.protocols import evaluate
from pipeline.federated.client import ClientParams, WorkingSet, train_clients
from pipeline.federated.sampling import client_data, epoch_rows
from pipeline.federated.state import PersonalStore
from pipeline.models import backbone
from pipeline.models.base import InitialState

_EVAL_ROW_BUDGET = 1 << 21  # (user, item) rows scored at once


@dataclass
class Upload:
    """What a shard sends after a round (reduced over its clients).

    table_items: name -> [K] items touched.  table_sums: name -> [K, d] sum_c w_c * delta_c.
    dense_sums: name -> sum_c w_c * delta_c of each global dense weight.
    weight: sum_c w_c (w_c = 1 for a uniform mean, rows processed for the weighted mean).
    """

    table_items: dict[str, torch.Tensor] = field(default_factory=dict)
    table_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    dense_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    weight: float = 0.0
    clients: int = 0
    rows: int = 0
    loss_sum: float = 0.0
    seconds: float = 0.0

    def nbytes(self) -> int:
        tensors = [*self.table_items.values(), *self.table_sums.values(), *self.dense_sums.values()]
        return int(sum(t.numel() * t.element_size() for t in tensors))


class EvalRows:
    """RowContext for scoring B users against all I items (R = B * I rows, user-major)."""

    def __init__(self, shard: "Shard", global_params: dict[str, torch.Tensor], local: torch.Tensor):
        self.shard, self.globals = shard, global_params
        n_items = shard.data.n_items
        self.local = local.repeat_interleave(n_items)
        self.item = torch.arange(n_items).repeat(len(local))
        self.row_user = torch.arange(len(local)).repeat_interleave(n_items)
        self.user_local = local

    def table(self, name: str) -> torch.Tensor:
        store, model = self.shard.store, self.shard.model
        if name in store.tables:
            return store.table_rows(name, self.local, self.item)
        if name in store.copies and self.shard.config.model.pfedrec_eval_table == "personal":
            return store.copy_rows(name, self.local, self.item, self.globals[name])
        return self.globals[name][self.item]

    def vector(self, name: str) -> torch.Tensor:
        return self.shard.store.dense[name][self.user_local][self.row_user]

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.globals[f"{name}.weight"], self.globals[f"{name}.bias"])


class Shard:
    """The users `users` of a prepared dataset, with their personal state."""

    def __init__(self, config: ExperimentConfig, data: PreparedDataset, negatives: EvalNegatives | None,
                 users: np.ndarray, initial: InitialState, dtype=torch.float32):
        self.config, self.data, self.negatives = config, data, negatives
        self.model = backbone(config.model.backbone)
        self.dtype = dtype
        self.store = PersonalStore(self.model, initial, np.sort(users), data.n_items, dtype)

    @property
    def users(self) -> np.ndarray:
        return self.store.users

    def train(self, round_: int, global_params: dict[str, torch.Tensor], users: np.ndarray,
              lrs: dict[str, float]) -> Upload:
        """Local training of `users` (global ids of this shard) in round `round_`."""
        started = time.perf_counter()
        upload = Upload()
        if len(users) == 0:
            return upload
        model, train_cfg = self.model, self.config.train
        users = np.sort(np.asarray(users, dtype=np.int64))
        local = torch.as_tensor(self.store.local_index(users))
        clients = client_data(self.data, users, neg_pool=train_cfg.neg_pool,
                              neg_exclude_heldout=train_cfg.neg_exclude_heldout)
        epochs = [epoch_rows(clients, neg_ratio=train_cfg.neg_ratio, rows_per_batch=train_cfg.rows_per_batch(),
                             seed=train_cfg.seed, round_=round_, epoch=e) for e in range(train_cfg.local_epochs)]
        ws = WorkingSet.of(epochs, self.data.n_items)
        ws_client, ws_item = torch.as_tensor(ws.client), torch.as_tensor(ws.item)
        ws_local = local[ws_client]
        globals_ = {name: value.to(self.dtype) for name, value in global_params.items()}

        tables = {name: globals_[name][ws_item].clone() for name in model.GLOBAL_TABLES}
        tables.update({name: self.store.table_rows(name, ws_local, ws_item) for name in model.PERSONAL_TABLES})
        vectors = {name: self.store.dense[name][local].clone() for name in model.PERSONAL_DENSE}
        vectors.update({name: globals_[name].expand(len(users), *globals_[name].shape).clone()
                        for name in model.GLOBAL_DENSE})
        update = self.config.model.pfedrec_update if hasattr(model, "TWO_STEP_GROUPS") else "joint"
        result = train_clients(model, ClientParams(tables, vectors), ws, epochs, lrs=lrs, tol=train_cfg.tol,
                               round_=round_, model_config=self.config.model, update=update)
        trained = result.params

        for name in model.PERSONAL_DENSE:
            self.store.dense[name][local] = trained.vectors[name]
        for name in model.PERSONAL_TABLES:
            self.store.tables[name].write(ws_local * self.data.n_items + ws_item, trained.tables[name])
        self.store.save_copies(round_, global_params, local, ws_local, ws_item, trained.tables)

        weights = torch.as_tensor(result.rows if model.AGGREGATION == "weighted" else np.ones(len(users)),
                                  dtype=self.dtype)
        items, inverse = torch.unique(ws_item, return_inverse=True)
        for name in model.GLOBAL_TABLES:
            delta = (trained.tables[name] - tables[name]) * weights[ws_client][:, None]
            upload.table_items[name] = items
            upload.table_sums[name] = torch.zeros(len(items), delta.shape[1], dtype=self.dtype).index_add_(0, inverse, delta)
        for name in model.GLOBAL_DENSE:
            delta = trained.vectors[name] - vectors[name]
            upload.dense_sums[name] = (delta * weights.view(-1, *[1] * (delta.dim() - 1))).sum(0)
        upload.weight = float(weights.sum())
        upload.clients, upload.rows = len(users), int(result.rows.sum())
        upload.loss_sum = float(np.nansum(result.loss))
        upload.seconds = time.perf_counter() - started
        return upload

    def scores(self, global_params: dict[str, torch.Tensor], users: torch.Tensor) -> torch.Tensor:
        """[B, I] logits of users (global ids of this shard) over all items."""
        local = torch.as_tensor(self.store.local_index(np.asarray(users)))
        globals_ = {name: value.to(self.dtype) for name, value in global_params.items()}
        with torch.no_grad():
            return self.model.logits(EvalRows(self, globals_, local)).view(len(local), self.data.n_items)

    def evaluate(self, global_params: dict[str, torch.Tensor], protocol: str, split: str,
                 ks: tuple[int, ...]) -> tuple[dict[str, float], int]:
        """Mean metrics over this shard's users and their count (for a weighted reduce)."""
        batch = max(1, _EVAL_ROW_BUDGET // self.data.n_items)
        metrics = evaluate(lambda users: self.scores(global_params, users), self.data, protocol, split,
                           negatives=self.negatives, ks=ks, batch_users=batch, users=self.users)
        return metrics, len(self.users)
