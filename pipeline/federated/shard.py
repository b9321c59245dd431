"""A shard of users: their private state, their local training, their evaluation.

This is the whole job of a ClientPool, without Ray: the actor only wraps it. Uploads are
reduced over the shard's clients (weighted sums of deltas and the weight total), so a pool
sends O(touched rows) per round, not one message per client.

Shapes: B = clients trained now, W = working-set rows, K = distinct items touched, I, d.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.config import ExperimentConfig
from pipeline.data.negatives import EvalNegatives
from pipeline.data.prepare import PreparedDataset
from pipeline.eval.protocols import evaluate
from pipeline.federated.client import (ClientParams, Distillation, FeatureSpan, FusionInputs, FusionRows, StepSchedule,
                                      WorkingSet, client_mixing, train_clients)
from pipeline.federated.group_server import TeacherDownload, flatten_vectors
from pipeline.federated.grouped import GroupPlan
from pipeline.federated.memory import keep_freed_memory
from pipeline.federated.privacy import clip_factors
from pipeline.federated.scoring import BlockScorer
from pipeline.federated.sampling import client_data, epoch_rows
from pipeline.federated.state import PersonalStore
from pipeline.models import model_for
from pipeline.models.base import InitialState
from pipeline.models.fusion import check_features
from pipeline.models.group_fusion import group_delta_sums

RHO = "gfmfr.rho"  # the store's entry of the clients' distillation-weight EMA (not a parameter)
_EVAL_ROW_BUDGET = 1 << 21  # (user, item) scores the evaluator ranks at once
SPAN_MAX_ITEMS = 4096  # FedMR feature projections held on the working set (K = X X^T is [I, I])
SPAN_ITEMS_PER_WIDTH = 2.0  # ... when the items are at most 2 x the feature width (see _spans)


@dataclass
class Upload:
    """What a shard sends after a round (reduced over its clients).

    table_items: name -> [K] items touched.  table_sums: name -> [K, d] sum_c w_c * delta_c.
    dense_sums: name -> sum_c w_c * delta_c of each global dense weight.
    grad_sums: name -> sum_c w_c * g_c, last-batch gradients (FedMR fusion_agg=grad_adam).
    weight: sum_c w_c (w_c = 1 for a uniform mean, rows processed for the weighted mean).
    """

    table_items: dict[str, torch.Tensor] = field(default_factory=dict)
    table_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    dense_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    grad_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    weight: float = 0.0
    # weight decay: name -> sum_c w_c (f_c - 1), f_c the factor by which client c's decay scaled the
    # rows it never touched; the server scales the whole table by 1 + this / weight (aggregate.py)
    table_scale_sums: dict[str, float] = field(default_factory=dict)
    clients: int = 0
    rows: int = 0
    loss_sum: float = 0.0
    seconds: float = 0.0
    # GFMFR: the clients in upload order, their grouping vectors [B, F], their
    # FedMR mixing weights [B, 3] (moe), and the (sum, count) of their final rho (shared_round)
    group_users: np.ndarray | None = None
    group_vectors: torch.Tensor | None = None
    group_alpha: torch.Tensor | None = None
    rho: tuple[float, int] = (0.0, 0)
    distilled: int = 0  # clients that trained with a teacher
    clipped: int = 0  # privacy: clients whose update was scaled down to the clip norm

    def nbytes(self) -> int:
        tensors = [*self.table_items.values(), *self.table_sums.values(), *self.dense_sums.values(),
                   *self.grad_sums.values(), *(t for t in (self.group_vectors, self.group_alpha) if t is not None)]
        return int(sum(t.numel() * t.element_size() for t in tensors))


class EvalRows:
    """RowContext for scoring B users (local indices `local`) against items: by default all I
    items (R = B * I rows, user-major); else rows (row_user [R] in 0..B-1, sorted; item [R]).
    candidates: [B, I] bool, the items a user's scores are asked for (FedMR batch mixing);
    or count: [R] how often each of the given rows counts in them (0 for a repeated row)."""

    def __init__(self, shard: "Shard", global_params: dict[str, torch.Tensor], local: torch.Tensor,
                 row_user: torch.Tensor | None = None, item: torch.Tensor | None = None,
                 candidates: torch.Tensor | None = None, count: torch.Tensor | None = None):
        self.shard, self.globals = shard, global_params
        self.grid = row_user is None  # every user against every item
        if row_user is None:
            n_items = shard.data.n_items
            row_user = torch.arange(len(local), device=local.device).repeat_interleave(n_items)
            item = torch.arange(n_items, device=local.device).repeat(len(local))
        self.row_user, self.item = row_user, item
        self.local = local[row_user]
        self.user_local = local
        self.candidates = candidates
        self.count = count
        self.base_only = False  # personal tables read as their shared base (item_rows)
        self._plan = None

    def table(self, name: str) -> torch.Tensor:
        store = self.shard.store
        if name in store.tables:
            if self.base_only:
                return store.table_base[name].index_select(0, self.item)
            return store.table_rows(name, self.local, self.item)
        if name in store.copies and self.shard.config.model.pfedrec_eval_table == "personal":
            return store.copy_rows(name, self.local, self.item, self.globals[name])
        return self.globals[name].index_select(0, self.item)

    def vector(self, name: str) -> torch.Tensor:
        dense = self.shard.store.dense
        if name not in dense:  # a global weight, the same for every row
            return self.globals[name]
        return dense[name].index_select(0, self.user_local).index_select(0, self.row_user)

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        dense = self.shard.store.dense
        if f"{name}.weight" not in dense:
            return torch.nn.functional.linear(x, self.globals[f"{name}.weight"], self.globals[f"{name}.bias"])
        # a personal Linear (FedMR's local router): each user's persisted copy
        if self._plan is None:
            present, counts = torch.unique_consecutive(self.row_user, return_counts=True)
            self._plan = (present, GroupPlan(counts))
        present, plan = self._plan
        return plan.apply(x, dense[f"{name}.weight"][self.user_local[present]]) + self.vector(f"{name}.bias")

    # -- what a fusion module needs: evaluation mode --------------------------

    def feature_linear(self, modality: str, name: str) -> torch.Tensor:
        """The global projection of the frozen features, computed once per item."""
        features = self.shard.features[modality]
        projected = torch.nn.functional.linear(features, self.globals[f"{name}.weight"], self.globals[f"{name}.bias"])
        return projected.index_select(0, self.item)

    def dropout(self, x: torch.Tensor, site: int) -> torch.Tensor:
        return x  # evaluation runs in eval mode

    def item_rows(self) -> tuple["EvalRows", torch.Tensor]:
        """(a context over the distinct items of these rows, item row of every row): for the
        parts of a model that do not depend on the user (global weights and tables; personal
        tables read as their shared base, see personal_rows)."""
        items, of_row = torch.unique(self.item, return_inverse=True)
        ctx = EvalRows(self.shard, self.globals, self.user_local[:1],
                       torch.zeros(len(items), dtype=torch.int64, device=items.device), items)
        ctx.base_only = True
        return ctx, of_row

    def personal_rows(self) -> torch.Tensor:
        """Rows whose user holds an own row of a personal item table (where it is not the base)."""
        store = self.shard.store
        own = torch.zeros(len(self.item), dtype=torch.bool, device=self.item.device)
        for rows in store.tables.values():
            own |= rows.lookup(self.local * store.n_items + self.item)[0]
        return torch.nonzero(own).squeeze(1)

    def subset(self, index: torch.Tensor) -> "EvalRows":
        return EvalRows(self.shard, self.globals, self.user_local, self.row_user[index], self.item[index],
                        self.candidates, None if self.count is None else self.count[index])

    def fusion_rows(self, history: bool) -> FusionRows:
        """The scored rows; mixing rows: each user's training positives (history: the same
        alpha_u whatever is scored, D9) or the scored candidates (batch)."""
        data, users = self.shard.data, self.shard.store.users[self.user_local.numpy()]
        starts, stops = data.train_indptr[users], data.train_indptr[users + 1]
        counts = stops - starts
        owner = torch.as_tensor(np.repeat(np.arange(len(users)), counts))
        offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        positives = torch.as_tensor(data.train_items[np.repeat(starts, counts) + offsets])
        dtype = next(iter(self.globals.values())).dtype
        if self.count is not None:
            count = self.count.to(dtype)
        elif self.candidates is None:
            count = torch.ones(len(self.item), dtype=dtype)
        else:
            count = self.candidates[self.row_user, self.item].to(dtype)
        if self.grid or not history:  # the grid holds every positive already
            trained = torch.zeros(len(users), data.n_items, dtype=torch.bool)
            trained[owner, positives] = True
            return FusionRows(ctx=self, index=None, history=trained[self.row_user, self.item], count=count,
                              segment=self.row_user, n_segments=len(self.user_local))
        # a subset of items is scored: the users' positives join as extra (mixing-only) rows
        n = len(self.item)
        ctx = EvalRows(self.shard, self.globals, self.user_local, torch.cat([self.row_user, owner]),
                       torch.cat([self.item, positives]), self.candidates)
        is_history = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(len(owner), dtype=torch.bool)])
        return FusionRows(ctx=ctx, index=torch.arange(n), history=is_history,
                          count=torch.cat([count, torch.zeros(len(owner), dtype=dtype)]),
                          segment=ctx.row_user, n_segments=len(self.user_local))


def _touched_items(ws_item: np.ndarray, n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(distinct items [K] sorted, position in them of every row [W]): torch.unique without its
    sort when the catalogue is not much larger than the working set (a bincount instead)."""
    if n_items > 4 * len(ws_item):
        items, inverse = torch.unique(torch.as_tensor(ws_item), return_inverse=True)
        return items, inverse
    touched = np.bincount(ws_item, minlength=n_items) > 0
    rank = np.cumsum(touched) - 1
    return torch.as_tensor(np.flatnonzero(touched)), torch.as_tensor(rank[ws_item])


class Shard:
    """The users `users` of a prepared dataset, with their personal state."""

    def __init__(self, config: ExperimentConfig, data: PreparedDataset, negatives: EvalNegatives | None,
                 users: np.ndarray, initial: InitialState, dtype=torch.float32, device: str = "cpu"):
        self.config, self.data, self.negatives = config, data, negatives
        self.model = model_for(config.model)
        self.dtype = dtype
        self.device = torch.device(device)  # where the private state lives and local training runs
        if self.device.type != "cpu" and config.model.fusion is not None:
            raise ValueError("a fusion module (model.fusion) trains on the CPU only: set runtime.device=cpu")
        if config.model.fusion is not None:
            keep_freed_memory()  # its big per-step tensors then reuse warm pages (memory.py)
        self.store = PersonalStore(self.model, initial, np.sort(users), data.n_items, dtype, self.device,
                                   keep_copies=config.model.pfedrec_eval_table == "personal")
        self.features = {}  # FedMR: modality -> [I, d_m] frozen item features (read-only)
        check_features(config.model.fusion, data.features, data.name)
        for modality in getattr(self.model, "MODALITIES", ()):
            self.features[modality] = torch.as_tensor(np.asarray(data.features[modality])).to(dtype)
        # Gram matrices of the frozen features: client projections live on the working set
        # (client.FeatureSpan); above SPAN_MAX_ITEMS each client holds its own projection weights
        self.grams = {m: x @ x.T for m, x in self.features.items()} if data.n_items <= SPAN_MAX_ITEMS else {}
        if config.model.gfmfr is not None:  # GFMFR: every client's loss-ratio EMA (NaN: unset), persisted
            self.store.dense[RHO] = torch.full((len(self.store.users),), math.nan, dtype=torch.float64,
                                               device=self.device)
        self._for_groups = None  # GFMFR: this round's clients and their changes to model.GROUP_TABLE
        self.group_width = initial.global_params[self.model.GROUP_TABLE].shape[1] if config.model.gfmfr else 0

    @property
    def users(self) -> np.ndarray:
        return self.store.users

    def train(self, round_: int, global_params: dict[str, torch.Tensor], users: np.ndarray,
              lrs: dict[str, float], teacher: TeacherDownload | None = None) -> Upload:
        """Local training of `users` (global ids of this shard) in round `round_`; with GFMFR,
        clients with a group in `teacher` distil its scores."""
        started = time.perf_counter()
        upload = Upload()
        self._for_groups = None
        if len(users) == 0:
            return upload
        model, train_cfg = self.model, self.config.train
        users = np.sort(np.asarray(users, dtype=np.int64))
        if self.config.model.fusion is not None:
            # clients ordered by size: the fusion module's per-client layers run one bmm per
            # contiguous range of similar clients (grouped.PaddedLayout). Clients are
            # independent, so the order changes nothing but the summation order of uploads.
            users = users[np.argsort(self.data.train_counts[users], kind="stable")]
        device = self.device
        local = torch.as_tensor(self.store.local_index(users)).to(device)
        clients = client_data(self.data, users, neg_pool=train_cfg.neg_pool,
                              neg_exclude_heldout=train_cfg.neg_exclude_heldout)
        sort_device = device if device.type != "cpu" else None
        epochs = [epoch_rows(clients, neg_ratio=train_cfg.neg_ratio, rows_per_batch=train_cfg.rows_per_batch(),
                             seed=train_cfg.seed, round_=round_, epoch=e, sort_device=sort_device,
                             neg_draw=train_cfg.neg_draw)
                  for e in range(train_cfg.local_epochs)]
        ws = WorkingSet.of(epochs, self.data.n_items)
        ws_client, ws_item = torch.as_tensor(ws.client).to(device), torch.as_tensor(ws.item).to(device)
        ws_local = local.index_select(0, ws_client)
        globals_ = {name: value.to(device=device, dtype=self.dtype) for name, value in global_params.items()}

        tables = {name: globals_[name].index_select(0, ws_item) for name in model.GLOBAL_TABLES}
        tables.update({name: self.store.table_rows(name, ws_local, ws_item) for name in model.PERSONAL_TABLES})
        vectors = {name: self.store.dense[name].index_select(0, local) for name in model.PERSONAL_DENSE}
        spans = self._spans(globals_, ws, len(users))
        # copies of global weights: broadcast views (train_clients copies what it trains)
        vectors.update({name: globals_[name].expand(len(users), *globals_[name].shape)
                        for name in model.GLOBAL_DENSE if name not in spans})
        update = self.config.model.pfedrec_update if hasattr(model, "TWO_STEP_GROUPS") else "joint"
        fusion = None
        if self.config.model.fusion is not None:
            fusion = FusionInputs(features=self.features, ws_client=ws.client, ws_item=ws.item, users=users,
                                  seed=train_cfg.seed, dropout=self.config.model.fusion.dropout,
                                  n_clients=len(users), span={span.modality: span for span in spans.values()})
            for span in spans.values():
                tables[span.table] = globals_[span.weight].new_zeros(len(ws.client), globals_[span.weight].shape[0])
                lrs = {**lrs, span.table: lrs[span.weight]}
        distil = self._distillation(teacher, users, local, ws) if teacher is not None else None
        result = train_clients(model, ClientParams(tables, vectors), ws, epochs, lrs=lrs, tol=train_cfg.tol,
                               round_=round_, model_config=self.config.model, update=update, fusion=fusion,
                               distil=distil, schedule=StepSchedule(train_cfg.lr_batch_decay, train_cfg.weight_decay),
                               # blocks keep a CPU step in cache; a GPU wants one launch for everyone
                               chunk_rows=self.config.runtime.block_rows if device.type == "cpu" else None)
        trained = result.params
        diverged = ~np.isfinite(result.loss) & (result.epochs > 0)
        if diverged.any():  # a hard failure, never a skipped batch
            raise FloatingPointError(
                f"round {round_}: the training loss of {int(diverged.sum())} client(s) is not finite (users "
                f"{users[diverged][:5].tolist()}...); lower train.lr (GFMFR: the loss-ratio weight of the "
                f"distillation term grows as student and teacher agree)")

        for name in model.PERSONAL_DENSE:
            self.store.dense[name][local] = trained.vectors[name]
        decayed = train_cfg.weight_decay > 0  # rows outside the working set were scaled by table_decay
        factor = {name: torch.as_tensor(value, dtype=self.dtype).to(device) for name, value in result.table_decay.items()}
        for name in model.PERSONAL_TABLES:
            if decayed:
                self.store.scale_table(name, local, factor[name])
            self.store.write_table(name, ws_local, ws_item, trained.tables[name])
        self.store.save_copies(round_, global_params, local, ws_local, ws_item, trained.tables,
                               scale=factor if decayed else None)

        weights = torch.as_tensor(result.rows if model.AGGREGATION == "weighted" else np.ones(len(users)),
                                  dtype=self.dtype).to(device)
        privacy = self.config.privacy
        if privacy is not None:  # uniform weights, each client's update scaled to norm <= clip
            squared = self._update_norms(trained, tables, vectors, result.last_grads, ws_client, len(users))
            weights = clip_factors(squared, privacy.clip)
            upload.clipped = int((weights < 1).sum())
        if model.GLOBAL_TABLES:
            items, inverse = _touched_items(ws.item, self.data.n_items)
            inverse = inverse.to(device)
        for name in model.GLOBAL_TABLES:
            start = tables[name]
            if decayed:  # a client's change = (f_c - 1) Q on every row + this correction on its rows
                start = start * factor[name].index_select(0, ws_client)[:, None]
                upload.table_scale_sums[name] = float(((factor[name] - 1) * weights).sum())
            delta = (trained.tables[name] - start).mul_(weights.index_select(0, ws_client)[:, None])
            upload.table_items[name] = items
            upload.table_sums[name] = delta.new_zeros(len(items), delta.shape[1]).index_add_(0, inverse, delta).cpu()
        grads = getattr(model, "UPLOAD_GRADS", ())
        for name, span in spans.items():  # sum_c w_c dW_c = (w A)^T X[ws_item], summed per item first
            rows = result.last_grads[span.table] if name in grads else trained.tables[span.table]
            per_item = rows.new_zeros(self.data.n_items, rows.shape[1]).index_add_(
                0, ws_item, rows * weights[ws_client][:, None])
            summed = torch.mm(per_item.T, self.features[span.modality])
            (upload.grad_sums if name in grads else upload.dense_sums)[name] = summed
        for name in model.GLOBAL_DENSE:
            if name in spans:
                continue
            if name in grads:  # grad_adam: the last-batch gradient, not the trained weights
                grad = result.last_grads[name]
                upload.grad_sums[name] = (grad * weights.view(-1, *[1] * (grad.dim() - 1))).sum(0).cpu()
                continue
            delta = trained.vectors[name] - vectors[name]
            upload.dense_sums[name] = (delta * weights.view(-1, *[1] * (delta.dim() - 1))).sum(0).cpu()
        gfmfr = self.config.model.gfmfr
        if gfmfr is not None:
            if distil is not None:
                upload.distilled = int(distil.grouped.sum())
                if gfmfr.ema_scope == "client":
                    self.store.dense[RHO][local] = torch.as_tensor(distil.rho).to(self.store.dense[RHO].device)
                else:
                    final = distil.rho[~np.isnan(distil.rho)]
                    upload.rho = (float(final.sum()), len(final))
            upload.group_users = users
            upload.group_vectors = flatten_vectors(model, trained.vectors, len(users)).cpu()
            if self.config.model.fusion is not None and self.config.model.fusion.fusion == "moe":
                upload.group_alpha = client_mixing(model, trained, ws, epochs, fusion).cpu()
            name = model.GROUP_TABLE
            self._for_groups = (ws_client, ws_item, trained.tables[name] - tables[name])
        upload.weight = float(weights.sum()) if privacy is None else float(len(users))
        upload.clients, upload.rows = len(users), int(result.rows.sum())
        upload.loss_sum = float(np.nansum(result.loss))
        upload.seconds = time.perf_counter() - started
        return upload

    def _update_norms(self, trained, tables: dict, vectors: dict, last_grads: dict, ws_client: torch.Tensor,
                      n_clients: int) -> torch.Tensor:
        """[B] squared L2 norm of each client's whole update (privacy.py): its changes to the global
        tables' rows it touched and to the global dense weights, or its last-batch gradients."""
        model = self.model
        grads = getattr(model, "UPLOAD_GRADS", ())
        squared = torch.zeros(n_clients, dtype=torch.float64, device=ws_client.device)
        for name in model.GLOBAL_TABLES:
            rows = (trained.tables[name] - tables[name]).double().square().sum(1)
            squared.index_add_(0, ws_client, rows)
        for name in model.GLOBAL_DENSE:
            change = last_grads[name] if name in grads else trained.vectors[name] - vectors[name]
            squared += change.double().square().reshape(n_clients, -1).sum(1)
        return squared.to(self.dtype)

    def _distillation(self, teacher: TeacherDownload, users: np.ndarray, local: torch.Tensor,
                      ws: WorkingSet) -> Distillation:
        """The round's distillation inputs of `users`: each client's teacher at its own
        working-set rows (what it receives: s_{g(u)} at its items), and its rho."""
        group = torch.as_tensor(teacher.group_of[users])
        empty = torch.isnan(teacher.scores[:, 0])  # groups without members this round
        grouped = ((group >= 0) & ~empty[group.clamp(min=0)]).numpy()
        rows = self.teacher_rows(teacher.scores, group, torch.as_tensor(ws.client), torch.as_tensor(ws.item))
        if self.config.model.gfmfr.ema_scope == "client":
            rho = self.store.dense[RHO][local].cpu().numpy().copy()
        else:
            rho = np.where(grouped, teacher.shared_rho, math.nan)
        return Distillation(teacher=rows.to(device=self.device, dtype=self.dtype), grouped=grouped, rho=rho,
                            weight=teacher.weight, rho_max=self.config.model.gfmfr.rho_max)

    @staticmethod
    def teacher_rows(scores: torch.Tensor, group: torch.Tensor, row_client: torch.Tensor,
                     row_item: torch.Tensor) -> torch.Tensor:
        """[W] s_{g(c)}[i] at rows (row_client [W], row_item [W]) of clients with groups group [B]
        (UNGROUPED, or a group without members this round: NaN, no teacher)."""
        row_group = group.index_select(0, row_client)
        values = scores[row_group.clamp(min=0), row_item]
        return torch.where(row_group >= 0, values, torch.full_like(values, math.nan))

    def group_sums(self, ids: np.ndarray, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sums [G, N, d], members [G]) of this round's clients' changes to model.GROUP_TABLE
        per group; ids [B]: the group of every client of the last upload, in its order."""
        if self._for_groups is None:
            if len(ids):
                raise RuntimeError("group_sums before this round's training (the pool was restarted)")
            return (torch.zeros(n_groups, self.data.n_items, self.group_width, dtype=self.dtype),
                    torch.zeros(n_groups, dtype=torch.int64))
        ws_client, ws_item, delta = self._for_groups
        sums, members = group_delta_sums(delta, ws_client, ws_item, torch.as_tensor(ids).to(ws_client.device),
                                         n_groups, self.data.n_items)
        return sums.cpu(), members.cpu()

    def _spans(self, globals_: dict[str, torch.Tensor], ws: WorkingSet, n_clients: int) -> dict[str, FeatureSpan]:
        """weight name -> FeatureSpan of the module's frozen-feature projections this round.
        Both forms are exact. Per row, a span costs a Gram row (I entries) and 2 I out
        multiply-adds; a weight copy costs the feature row (d entries), 4 d out multiply-adds
        (forward and weight gradient) and a per-client weight update per step. So a modality
        uses one when I <= 2 d (SPAN_ITEMS_PER_WIDTH): on KU (560 items, 512-d CLIP) both
        modalities do; on MovieLens (1,682 items) the 1,280-d images do and the 384-d text
        does not."""
        spans = {}
        if self.config.privacy is not None:  # clipping needs each client's weight change
            return spans
        for modality, gram in self.grams.items():
            weight = f"fedmr.proj.{modality}.weight"
            if weight in self.model.GLOBAL_DENSE and len(gram) <= SPAN_ITEMS_PER_WIDTH * self.features[modality].shape[1]:
                base = torch.mm(self.features[modality], globals_[weight].T)[torch.as_tensor(ws.item)]
                spans[weight] = FeatureSpan(modality=modality, weight=weight, table=f"fedmr.proj.{modality}.span",
                                            base=base, gram=gram, offsets=ws.offsets(n_clients))
        return spans

    def scores(self, global_params: dict[str, torch.Tensor], users: torch.Tensor) -> torch.Tensor:
        """[B, I] logits of users (global ids of this shard) over all items, as the evaluator
        ranks them (scoring.BlockScorer: matrix products in bounded blocks)."""
        return self.scorer(global_params)(users)

    def row_scores(self, global_params: dict[str, torch.Tensor], users: torch.Tensor,
                   candidates: torch.Tensor | None = None) -> torch.Tensor:
        """The same [B, I] logits computed one row per (user, item) pair (the reference that
        scoring.BlockScorer is tested against). candidates [B, I] bool: the items that will be
        read (only FedMR's batch mixing depends on it)."""
        local = torch.as_tensor(self.store.local_index(np.asarray(users))).to(self.device)
        globals_ = {name: value.to(device=self.device, dtype=self.dtype) for name, value in global_params.items()}
        with torch.no_grad():
            ctx = EvalRows(self, globals_, local, candidates=candidates)
            return self.model.logits(ctx).view(len(local), self.data.n_items).cpu()

    def _needs_candidates(self, protocol: str) -> bool:
        """FedMR batch mixing under P1: the scored batch is the user's 100 candidates."""
        fusion = self.config.model.fusion
        return (protocol == "p1" and fusion is not None and fusion.fusion == "moe"
                and fusion.mixing_source == "batch")

    def candidates(self, users: np.ndarray, split: str) -> torch.Tensor:
        """[B, I] bool: the P1 candidates (held-out item + persisted negatives) of `users`."""
        users = np.asarray(users)
        table = self.negatives.valid if split == "valid" else self.negatives.test
        target = self.data.valid_item if split == "valid" else self.data.test_item
        mask = torch.zeros(len(users), self.data.n_items, dtype=torch.bool)
        negatives = table[users].astype(np.int64)
        rows = np.repeat(np.arange(len(users)), negatives.shape[1])
        keep = negatives.reshape(-1) >= 0
        mask[torch.as_tensor(rows[keep]), torch.as_tensor(negatives.reshape(-1)[keep])] = True
        mask[torch.arange(len(users)), torch.as_tensor(target[users])] = True
        return mask

    def evaluate(self, global_params: dict[str, torch.Tensor], protocol: str, split: str,
                 ks: tuple[int, ...], users: np.ndarray | None = None) -> tuple[dict[str, float], int]:
        """Mean metrics over this shard's users (or `users`, a subset of them: a sampled evaluation)
        and their count (for a weighted reduce)."""
        users = self.users if users is None else np.asarray(users, dtype=np.int64)
        if len(users) == 0:
            return {}, 0
        width = self.data.n_items if protocol != "p1" or self.negatives is None else 1 + self.negatives.test.shape[1]
        batch = max(1, _EVAL_ROW_BUDGET // width)  # the scorer splits its own work further
        metrics = evaluate(self.scorer(global_params), self.data, protocol, split,
                           negatives=self.negatives, ks=ks, batch_users=batch, users=users)
        return metrics, len(users)

    def scorer(self, global_params: dict[str, torch.Tensor], protocol: str | None = None,
               split: str | None = None) -> BlockScorer:
        """users -> [B, I] logits with these globals, and score_candidates(users, items [B, C])
        -> [B, C] (what P1 asks for), for the evaluator. protocol and split change nothing: P1
        passes each user's candidates (FedMR's batch mixing reads them)."""
        return BlockScorer(self, global_params)

    def row_scorer(self, global_params: dict[str, torch.Tensor], protocol: str, split: str):
        """users -> [B, I] logits one row per pair (row_scores), the reference evaluator input
        (under P1 a FedMR model with batch mixing is passed each user's candidates of `split`)."""
        if self._needs_candidates(protocol):
            return lambda users: self.row_scores(global_params, users, self.candidates(np.asarray(users), split))
        return lambda users: self.row_scores(global_params, users)
