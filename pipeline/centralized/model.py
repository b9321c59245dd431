"""A federated model trained on pooled data: the same backbone (and FedMR module), one copy.

Centralized, the global parameters are plain dense tensors, and every personal parameter becomes
a per-user table: one row per user (heads, NCF user vectors, FedMR's local router), or one row per
(user, item) for a personal item table (FedRAP's P). The tables are embeddings with sparse
gradients, so a step touches only the rows of its users. The math is the federated engine's own:
`model.logits(ctx)` of pipeline/models, read through PooledRows (a RowContext). No Ray here.

What has no pooled counterpart is left out, by construction: FCF's and PFedRec's item-lr rules
and PFedRec's per-round fine-tuned copy of Q (pooled, Q is the one table every user reads; its
evaluation reads it too), FedRAP's per-round lr decay; one Adam step updates everything.
FedRAP's tanh ramps of lambda and mu run on the epoch.

Shapes: R = rows (user, item) scored, F = rows the fusion module computes on, U users, I items.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import ExperimentConfig
from pipeline.federated.strategy.aggregate import feature_dims, initial_state
from pipeline.federated.engine.client import FusionRows
from pipeline.federated.engine.grouped import GroupPlan
from pipeline.federated.engine.sampling import csr_take, dropout_keep
from pipeline.models import model_for

_ITEM_USER = -1  # the user id that keys dropout on rows shared by every user (item rows)


def _slot(name: str) -> str:
    """A parameter name as a module key (torch forbids dots there)."""
    return name.replace(".", "__")


def pooled_model_config(model_config):
    """The model config pooled training uses: PFedRec reads its one Q in evaluation too."""
    if model_config.backbone == "pfedrec":
        return model_config.model_copy(update={"pfedrec_eval_table": "global"})
    return model_config


class PooledModel(torch.nn.Module):
    """One model for all users: dense globals (`dense`), per-user tables (`personal`), the frozen
    item features (buffers, never trained), the training positives (for FedMR's history mixing).

    forward(user [R], item [R], label [R], epoch, step) -> the summed loss of the rows (BCE with
    logits + the backbone's row regulariser), the quantity data-parallel workers add up.
    """

    def __init__(self, config: ExperimentConfig, data, *, dtype=torch.float32):
        super().__init__()
        if config.model.gfmfr is not None:
            raise ValueError("model.gfmfr: GFMFR's groups and distillation are federated mechanisms with no pooled "
                             "counterpart; train the centralized bound of the backbone (+ FedMR) without it")
        model_config = pooled_model_config(config.model)
        self.dtype = dtype
        self.model = model_for(model_config)
        self.model_config = model_config
        self.n_users, self.n_items = data.n_users, data.n_items
        # (FedMR's init refuses a modality the dataset has no features for)
        state = initial_state(config.model_copy(update={"model": model_config}), data.n_users, data.n_items,
                              feature_dims(data))
        self.dense = torch.nn.ParameterDict({_slot(n): torch.nn.Parameter(t.to(dtype).clone())
                                             for n, t in state.global_params.items()})
        self.personal = torch.nn.ModuleDict()
        self.shapes: dict[str, tuple[int, ...]] = {}
        for name, value in state.personal_shared.items():  # every user starts from the shared value
            self._add_personal(name, value.to(dtype).reshape(1, -1).expand(data.n_users, -1), tuple(value.shape))
        for name, table in state.personal_per_user.items():  # row u: user u's initial value
            self._add_personal(name, table.to(dtype).reshape(data.n_users, -1), tuple(table.shape[1:]))
        self.item_tables = set(state.personal_table_base)
        for name, base in state.personal_table_base.items():  # row u * I + i: user u's copy of item i
            self._add_personal(name, base.to(dtype).repeat(data.n_users, 1), tuple(base.shape[1:]))
        for modality in self.model.MODALITIES:
            self.register_buffer(f"feature_{modality}", torch.as_tensor(np.asarray(data.features[modality])).to(dtype),
                                 persistent=False)
        self.train_indptr = np.asarray(data.train_indptr, dtype=np.int64)
        self.train_items = np.asarray(data.train_items, dtype=np.int64)
        self.dropout_p = model_config.fusion.dropout if model_config.fusion is not None else 0.0
        # FedMR computes its experts once per item when e_i is the same for every user (fusion._experts)
        self.experts_per_item = self.model.FUSION is not None and self.model.id_is_global

    def _add_personal(self, name: str, rows: torch.Tensor, shape: tuple[int, ...]) -> None:
        table = torch.nn.Embedding(rows.shape[0], rows.shape[1], sparse=True, dtype=rows.dtype)
        with torch.no_grad():
            table.weight.copy_(rows)
        self.personal[_slot(name)] = table
        self.shapes[name] = shape

    # -- what PooledRows reads -------------------------------------------------------------------

    def is_personal(self, name: str) -> bool:
        return _slot(name) in self.personal

    def global_param(self, name: str) -> torch.Tensor:
        return self.dense[_slot(name)]

    def personal_rows(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """[R, *shape] rows `index` of personal table `name` (user ids; user * I + item for item tables)."""
        return self.personal[_slot(name)](index).view(len(index), *self.shapes[name])

    def feature(self, modality: str) -> torch.Tensor:
        return getattr(self, f"feature_{modality}")

    def positives(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(owner [P] position in `users`, item [P]): the training positives of `users`."""
        indptr, items = csr_take(self.train_indptr, self.train_items, users)
        return np.repeat(np.arange(len(users)), np.diff(indptr)), items

    def sparse_parameters(self) -> list[torch.nn.Parameter]:
        return [table.weight for table in self.personal.values()]

    def dense_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.dense.values())

    # -- training and scoring ----------------------------------------------------------------------

    def rows(self, user: torch.Tensor, item: torch.Tensor, dropout_key: tuple[int, int, int] | None = None
             ) -> "PooledRows":
        """The context over rows (user [R], item [R]); dropout_key (seed, epoch, step) trains the
        fusion module's dropout (masks keyed by row, so a row gets the same mask on any worker)."""
        context = PooledItemRows if self.experts_per_item else PooledRows
        return context(self, user, item, dropout_key)

    def forward(self, user: torch.Tensor, item: torch.Tensor, label: torch.Tensor, epoch: int, step: int,
                seed: int) -> torch.Tensor:
        """The summed loss of the rows: BCE with logits (+ FedRAP's row regulariser, ramped on the epoch)."""
        ctx = self.rows(user, item, (seed, epoch, step))
        per_row = F.binary_cross_entropy_with_logits(self.model.logits(ctx), label.to(self.dtype), reduction="none")
        if self.model.row_regulariser is not None:
            per_row = per_row + self.model.row_regulariser(ctx, epoch, self.model_config)
        return per_row.sum()

    @torch.no_grad()
    def scores(self, users: torch.Tensor, row_budget: int | None = None) -> torch.Tensor:
        """[B, I] logits of users [B] (global ids) against every item, in chunks of users."""
        if row_budget is None:
            row_budget = (1 << 17) if self.model_config.fusion is not None else (1 << 21)
        per_chunk = max(1, row_budget // self.n_items)
        out = []
        device = next(iter(self.dense.values())).device
        for start in range(0, len(users), per_chunk):
            chunk = users[start:start + per_chunk].to(device)
            user = chunk.repeat_interleave(self.n_items)
            item = torch.arange(self.n_items, device=device).repeat(len(chunk))
            out.append(self.model.logits(self.rows(user, item)).view(len(chunk), self.n_items))
        return torch.cat(out).cpu()


class PooledRows:
    """RowContext (and FusionContext) over rows (user [R], item [R]) of a PooledModel: globals are
    shared, personal parameters are the row's user's rows. Training when `dropout_key` is set."""

    def __init__(self, pooled: PooledModel, user: torch.Tensor, item: torch.Tensor,
                 dropout_key: tuple[int, int, int] | None = None):
        self.pooled, self.user, self.item, self.dropout_key = pooled, user, item, dropout_key
        self._plan = None

    def _with(self, user: torch.Tensor, item: torch.Tensor) -> "PooledRows":
        return type(self)(self.pooled, user, item, self.dropout_key)

    def table(self, name: str) -> torch.Tensor:
        pooled = self.pooled
        if name in pooled.item_tables:
            return pooled.personal_rows(name, self.user * pooled.n_items + self.item)
        return pooled.global_param(name).index_select(0, self.item)

    def vector(self, name: str) -> torch.Tensor:
        if self.pooled.is_personal(name):
            return self.pooled.personal_rows(name, self.user)
        return self.pooled.global_param(name)

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """x [R, in] -> [R, out] through Linear `name`: global, or each row's user's own (FedMR's
        local router; then the rows must be grouped by user, as fusion_rows builds them)."""
        if not self.pooled.is_personal(f"{name}.weight"):
            return F.linear(x, self.pooled.global_param(f"{name}.weight"), self.pooled.global_param(f"{name}.bias"))
        if self._plan is None:
            present, counts = torch.unique_consecutive(self.user, return_counts=True)
            if len(present) > 1 and not bool((present[1:] > present[:-1]).all()):
                raise ValueError(f"personal Linear {name!r}: rows must be grouped by user, in user order")
            self._plan = (present, GroupPlan(counts))
        present, plan = self._plan
        weight = self.pooled.personal_rows(f"{name}.weight", present)
        return plan.apply(x, weight) + self.vector(f"{name}.bias")

    def feature_linear(self, modality: str, name: str) -> torch.Tensor:
        """The frozen features of the rows' items through Linear `name` (global: once per item)."""
        features = self.pooled.feature(modality)
        if self.pooled.is_personal(f"{name}.weight"):
            return self.linear(features.index_select(0, self.item), name)
        projected = F.linear(features, self.pooled.global_param(f"{name}.weight"),
                             self.pooled.global_param(f"{name}.bias"))
        return projected.index_select(0, self.item)

    def dropout(self, x: torch.Tensor, site: int) -> torch.Tensor:
        """Inverted dropout keyed by (seed, epoch, step, site, user, item, unit): the same mask for
        a row whichever worker computes it; identity when scoring."""
        p = self.pooled.dropout_p
        if self.dropout_key is None or p == 0:
            return x
        seed, epoch, step = self.dropout_key
        flat = x.reshape(len(x), -1)
        keep = dropout_keep(seed, epoch, 0, step, site, self.user.cpu().numpy(), self.item.cpu().numpy(),
                            flat.shape[1], p)
        mask = torch.from_numpy(keep).to(device=x.device, dtype=x.dtype).mul_(1.0 / (1.0 - p))
        return (flat * mask).view_as(x)

    def subset(self, index: torch.Tensor) -> "PooledRows":
        return self._with(self.user.index_select(0, index), self.item.index_select(0, index))

    def fusion_rows(self, history: bool) -> FusionRows:
        """The distinct (user, item) rows scored, plus every training positive of their users when
        `history` (S_u = H_u), grouped by user; how the scored rows map to them."""
        n_items = self.pooled.n_items
        device = self.user.device
        key = (self.user * n_items + self.item).cpu().numpy()
        users = np.unique(self.user.cpu().numpy())
        owner, positive = self.pooled.positives(users)
        positive_keys = users[owner] * n_items + positive
        rows = np.unique(np.concatenate([key, positive_keys]) if history else key)
        index = np.searchsorted(rows, key)
        count = np.bincount(index, minlength=len(rows))
        is_history = np.zeros(len(rows), dtype=bool)
        at = np.searchsorted(rows, positive_keys)
        inside = at < len(rows)
        is_history[at[inside][rows[at[inside]] == positive_keys[inside]]] = True
        row_user, row_item = rows // n_items, rows % n_items
        ctx = self._with(torch.as_tensor(row_user, device=device), torch.as_tensor(row_item, device=device))
        dtype = next(iter(self.pooled.dense.values())).dtype
        return FusionRows(ctx=ctx, index=torch.as_tensor(index, device=device),
                          history=torch.as_tensor(is_history, device=device),
                          count=torch.as_tensor(count, dtype=dtype, device=device),
                          segment=torch.as_tensor(np.searchsorted(users, row_user), device=device),
                          n_segments=len(users))


class PooledItemRows(PooledRows):
    """PooledRows for models whose FedMR input e_i is the same for every user: the experts are
    computed once per distinct item (fusion.FedMR._experts reads item_rows)."""

    def item_rows(self) -> tuple[PooledRows, torch.Tensor]:
        items, of_row = torch.unique(self.item, return_inverse=True)
        user = torch.full_like(items, _ITEM_USER)
        return PooledRows(self.pooled, user, items, self.dropout_key), of_row
