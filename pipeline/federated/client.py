"""Local training of many clients at once: one SGD step for all of them per mini-batch index.

Clients of a round are independent, so summing their per-client losses and differentiating
gives every client exactly its own gradient. Rows are flat (no padding): every row carries
its client's position; per-client means are segment sums. Item tables are trained on each
client's working set of touched rows only (DESIGN "Sparse item tables").

Shapes: B = clients, W = working-set rows (distinct (client, item) pairs), R = rows of a step.
Pure torch + numpy: no Ray here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.federated.grouped import grouped_linear
from pipeline.federated.sampling import EpochRows


@dataclass(frozen=True)
class WorkingSet:
    """Distinct (client, item) pairs of a round, sorted. client, item: [W] int64."""

    client: np.ndarray
    item: np.ndarray
    n_items: int

    @staticmethod
    def of(epochs: list[EpochRows], n_items: int) -> "WorkingSet":
        keys = np.unique(np.concatenate([rows.client * n_items + rows.item for rows in epochs]))
        return WorkingSet(client=keys // n_items, item=keys % n_items, n_items=n_items)

    def locate(self, client: np.ndarray, item: np.ndarray) -> np.ndarray:
        """[R] positions of (client, item) pairs in the working set (all must be members)."""
        return np.searchsorted(self.client * self.n_items + self.item, client * self.n_items + item)

    def offsets(self, n_clients: int) -> np.ndarray:
        """[B+1] CSR offsets: client b owns rows offsets[b]:offsets[b+1]."""
        out = np.zeros(n_clients + 1, dtype=np.int64)
        np.cumsum(np.bincount(self.client, minlength=n_clients), out=out[1:])
        return out


@dataclass
class ClientParams:
    """Parameters of B clients during a round.

    tables: name -> [W, d] working-set rows (copies of global tables, personal tables).
    vectors: name -> [B, ...] per-client tensors (personal vectors, copies of global weights).
    """

    tables: dict[str, torch.Tensor]
    vectors: dict[str, torch.Tensor]

    def all(self) -> dict[str, torch.Tensor]:
        return {**self.tables, **self.vectors}

    def detached(self) -> "ClientParams":
        return ClientParams({k: v.detach() for k, v in self.tables.items()},
                            {k: v.detach() for k, v in self.vectors.items()})


class StepRows:
    """RowContext for the rows of one step: each row reads its own client's parameters.

    client: [R] client positions (sorted), ws: [R] working-set positions.
    """

    def __init__(self, params: dict[str, torch.Tensor], client: torch.Tensor, ws: torch.Tensor):
        self.params, self.client, self.ws = params, client, ws
        self._groups = None

    def table(self, name: str) -> torch.Tensor:
        return self.params[name][self.ws]

    def vector(self, name: str) -> torch.Tensor:
        return self.params[name][self.client]

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """Per-client Linear: rows are grouped by client (see grouped.py)."""
        weight = self.params[f"{name}.weight"]
        if weight.shape[1] == 1:  # a single output is a row-wise dot product
            return (x * weight[self.client, 0]).sum(-1, keepdim=True) + self.vector(f"{name}.bias")
        if self._groups is None:
            self._groups = torch.unique_consecutive(self.client, return_counts=True)
        present, counts = self._groups
        return grouped_linear(x, weight[present], counts) + self.vector(f"{name}.bias")


@dataclass
class LocalResult:
    """params: trained ClientParams.  rows: [B] rows processed (summed over epochs run).
    epochs: [B] epochs run.  loss: [B] mean batch loss of the last epoch run."""

    params: ClientParams
    rows: np.ndarray
    epochs: np.ndarray
    loss: np.ndarray


def client_losses(model, params: dict[str, torch.Tensor], client: torch.Tensor, ws: torch.Tensor,
                  label: torch.Tensor, n_clients: int, round_: int, model_config) -> torch.Tensor:
    """[B] mean loss of each client over its rows of this step (0 for clients without rows)."""
    ctx = StepRows(params, client, ws)
    per_row = F.binary_cross_entropy_with_logits(model.logits(ctx), label, reduction="none")
    if hasattr(model, "row_regulariser"):
        per_row = per_row + model.row_regulariser(ctx, round_, model_config)
    sums = torch.zeros(n_clients, dtype=per_row.dtype).index_add_(0, client, per_row)
    counts = torch.bincount(client, minlength=n_clients).clamp(min=1)
    return sums / counts


def train_clients(model, params: ClientParams, working_set: WorkingSet, epochs: list[EpochRows], *,
                  lrs: dict[str, float], tol: float, round_: int, model_config,
                  update: str = "joint") -> LocalResult:
    """Run local training of all clients in `params` (B of them) over the pre-sampled epochs.

    lrs: the lr of every parameter name this round (decay and item multipliers applied).
    update: 'joint' (one SGD step on everything per mini-batch) or 'two_step' (PFedRec:
    model.TWO_STEP_GROUPS stepped one after the other, the loss recomputed in between).
    A client stops after epoch e >= 1 when |L_e - L_{e-1}| / (|L_e| + 1e-6) < tol.
    """
    n_clients = len(next(iter(params.vectors.values())))
    current = {name: tensor.detach().clone() for name, tensor in params.all().items()}
    groups = model.TWO_STEP_GROUPS if update == "two_step" else (tuple(current),)
    active = np.ones(n_clients, dtype=bool)
    rows_done = np.zeros(n_clients, dtype=np.int64)
    epochs_run = np.zeros(n_clients, dtype=np.int64)
    previous = last = np.full(n_clients, np.nan)
    for epoch, rows in enumerate(epochs):
        ws_index = working_set.locate(rows.client, rows.item)
        loss_sum = np.zeros(n_clients)
        n_batches = np.zeros(n_clients, dtype=np.int64)
        row_active = active[rows.client]
        for step in range(int(rows.n_batches[active].max(initial=0))):
            chosen = np.flatnonzero(row_active & (rows.batch == step))
            client = torch.as_tensor(rows.client[chosen])
            ws = torch.as_tensor(ws_index[chosen])
            label = torch.as_tensor(rows.label[chosen], dtype=next(iter(current.values())).dtype)
            present = np.unique(rows.client[chosen])
            for index, group in enumerate(groups):
                leaves = {name: current[name].requires_grad_(True) for name in group}
                losses = client_losses(model, current, client, ws, label, n_clients, round_, model_config)
                if index == 0:  # the epoch loss is the batch loss before any update
                    loss_sum[present] += losses.detach().numpy()[present]
                grads = torch.autograd.grad(losses.sum(), list(leaves.values()), allow_unused=True)
                with torch.no_grad():
                    for (name, leaf), grad in zip(leaves.items(), grads):
                        leaf.requires_grad_(False)
                        if grad is not None:
                            leaf.sub_(lrs[name] * grad)
            n_batches[present] += 1
        rows_done[active] += np.bincount(rows.client, minlength=n_clients)[active]
        epochs_run[active] += 1
        epoch_loss = np.where(n_batches > 0, loss_sum / np.maximum(n_batches, 1), np.nan)
        last = np.where(active, epoch_loss, last)
        if epoch >= 1:
            converged = np.abs(epoch_loss - previous) / (np.abs(epoch_loss) + 1e-6) < tol
            active &= ~converged
        previous = epoch_loss
        if not active.any():
            break
    trained = ClientParams({k: current[k] for k in params.tables}, {k: current[k] for k in params.vectors})
    return LocalResult(params=trained, rows=rows_done, epochs=epochs_run, loss=last)
