"""A shard of users: their private state, their local training, their evaluation.

This is the whole job of a ClientPool, without Ray: the actor only wraps it. Uploads are
reduced over the shard's clients (weighted sums of deltas and the weight total), so a pool
sends O(touched rows) per round, not one message per client.

Shapes: B = clients trained now, W = working-set rows, K = distinct items touched, I, d.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from pipeline.config import ExperimentConfig
from pipeline.data.negatives import EvalNegatives
from pipeline.data.prepare import PreparedDataset
from pipeline.eval.protocols import evaluate, new_covered
from pipeline.federated.engine.client import (ClientParams, Distillation, FeatureSpan, FusionInputs, StepSchedule,
                                      WorkingSet, client_mixing, train_clients)
from pipeline.federated.engine.memory import freed_memory_kept
from pipeline.federated.messages import TeacherDownload, Upload, flatten_vectors
from pipeline.federated.privacy import clip_factors
from pipeline.federated.engine.scoring import BlockScorer, EvalRows
from pipeline.federated.engine.sampling import client_data, epoch_rows
from pipeline.federated.engine.state import PersonalStore
from pipeline.models import model_for
from pipeline.models.base import InitialState
from pipeline.models.fusion import check_features
from pipeline.models.group_fusion import group_delta_sums

RHO = "gfmfr.rho"  # the store's entry of the clients' distillation-weight EMA (not a parameter)
_EVAL_ROW_BUDGET = 1 << 21  # (user, item) scores the evaluator ranks at once
SPAN_MAX_ITEMS = 4096  # FedMR feature projections held on the working set (K = X X^T is [I, I])
SPAN_ITEMS_PER_WIDTH = 2.0  # ... when the items are at most 2 x the feature width (see _spans)


class _KeptRows(NamedTuple):
    """A block's trained rows that the store keeps (personal tables, trained copies)."""

    local: torch.Tensor     # [B] the block's clients, shard-local
    ws_local: torch.Tensor  # [W] the client of every working-set row, shard-local
    ws_item: torch.Tensor   # [W]
    rows: dict[str, torch.Tensor]  # name -> [W, d]
    scale: dict[str, torch.Tensor] | None  # weight decay: name -> [B] factor of the untouched rows


class _RoundSums:
    """A round's upload summed over the blocks of clients Shard.train trains one after the other.

    Every figure of an Upload is a sum over clients, so a block adds its share and lets its
    rows go: table_sums per item into [I, d] (touched: [I] bool), the frozen-feature spans per
    item into [I, out] (multiplied by the features once, in upload()), dense and gradient sums.
    What stays per client across blocks is what the round must keep anyway: GFMFR's grouping
    vectors, mixing weights and group-table changes (the server clusters them), and `personal`,
    the trained rows the store keeps (Shard._write_personal_tables)."""

    def __init__(self, n_items: int):
        self.n_items = n_items
        self.tables: dict[str, torch.Tensor] = {}
        self.touched: dict[str, torch.Tensor] = {}
        self.spans: dict[str, tuple[str, bool, torch.Tensor]] = {}  # weight -> (modality, is grad, [I, out])
        self.dense: dict[str, torch.Tensor] = {}
        self.grad: dict[str, torch.Tensor] = {}
        self.table_scale: dict[str, float] = {}
        self.personal: list[_KeptRows] = []  # one per block
        self.group_users: list[np.ndarray] = []
        self.group_vectors: list[torch.Tensor] = []
        self.group_alpha: list[torch.Tensor] = []
        self.group_rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (client, item, delta)
        self.weight = 0.0
        self.clients = self.rows = self.clipped = self.distilled = 0
        self.loss_sum = 0.0
        self.rho = (0.0, 0)

    @staticmethod
    def add(sums: dict, name: str, value):
        """sums[name] += value (the first block's value is taken as it is)."""
        sums[name] = value if name not in sums else sums[name] + value

    def add_table(self, name: str, ws_item: torch.Tensor, rows: torch.Tensor) -> None:
        """rows [W, d]: a block's w_c delta_c at its working-set items."""
        if name not in self.tables:
            self.tables[name] = rows.new_zeros(self.n_items, rows.shape[1])
            self.touched[name] = torch.zeros(self.n_items, dtype=torch.bool, device=rows.device)
        self.tables[name].index_add_(0, ws_item, rows)
        self.touched[name][ws_item] = True

    def add_span(self, weight: str, modality: str, is_grad: bool, ws_item: torch.Tensor, rows: torch.Tensor) -> None:
        """rows [W, out]: a block's weighted span rows at its working-set items."""
        if weight not in self.spans:
            self.spans[weight] = (modality, is_grad, rows.new_zeros(self.n_items, rows.shape[1]))
        self.spans[weight][2].index_add_(0, ws_item, rows)

    def upload(self, features: dict[str, torch.Tensor], privacy: bool) -> Upload:
        """The Upload of every block added (its tensors on the CPU)."""
        upload = Upload(weight=float(self.clients) if privacy else self.weight, table_scale_sums=self.table_scale,
                        clients=self.clients, rows=self.rows, loss_sum=self.loss_sum, rho=self.rho,
                        distilled=self.distilled, clipped=self.clipped)
        for name, sums in self.tables.items():
            items = torch.nonzero(self.touched[name]).squeeze(1)
            upload.table_items[name] = items.cpu()
            upload.table_sums[name] = sums.index_select(0, items).cpu()
        for weight, (modality, is_grad, per_item) in self.spans.items():  # sum_c w_c dW_c = (w A)^T X
            summed = torch.mm(per_item.T, features[modality]).cpu()
            (upload.grad_sums if is_grad else upload.dense_sums)[weight] = summed
        upload.dense_sums.update({name: value.cpu() for name, value in self.dense.items()})
        upload.grad_sums.update({name: value.cpu() for name, value in self.grad.items()})
        if self.group_users:
            upload.group_users = np.concatenate(self.group_users)
            upload.group_vectors = torch.cat(self.group_vectors)
            if self.group_alpha:
                upload.group_alpha = torch.cat(self.group_alpha)
        return upload


class Shard:
    """The users `users` of a prepared dataset, with their personal state."""

    def __init__(self, config: ExperimentConfig, data: PreparedDataset, negatives: EvalNegatives | None,
                 users: np.ndarray, initial: InitialState, dtype=torch.float32, device: str = "cpu"):
        self.config, self.data, self.negatives = config, data, negatives
        self.model = model_for(config.model)
        self.dtype = dtype
        self.device = torch.device(device)  # where the private state lives and local training runs
        self.precision = config.runtime.precision
        if self.precision == "bf16" and dtype != torch.float32:
            raise ValueError(f"runtime.precision=bf16 keeps float32 master weights; these pools hold {dtype} "
                             "(the float64 equivalence runs need runtime.precision=fp32)")
        self.store = PersonalStore(self.model, initial, np.sort(users), data.n_items, dtype, self.device,
                                   keep_copies=config.model.pfedrec_eval_table == "personal")
        self.features = {}  # FedMR: modality -> [I, d_m] frozen item features (read-only, on the device)
        check_features(config.model.fusion, data.features, data.name)
        for modality in self.model.MODALITIES:
            self.features[modality] = torch.as_tensor(np.asarray(data.features[modality])).to(device=self.device,
                                                                                              dtype=dtype)
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
              lrs: dict[str, float], teacher: TeacherDownload | None = None,
              progress: Callable[[int], None] | None = None) -> Upload:
        """Local training of `users` (global ids of this shard) in round `round_`; with GFMFR,
        clients with a group in `teacher` distil its scores. progress: called with the number
        of clients of each block as the block finishes (what a progress display counts).

        Clients are independent, so they are trained in blocks of at most
        runtime.train_block_clients consecutive clients (of the order below): each block builds
        its own rows, working set and per-client copies of the global weights, trains, writes
        its clients' personal state back and adds its contributions to the round's sums
        (_RoundSums), then lets all of it go. Peak memory follows the block, not the number of
        clients; the upload is the same up to the summation order of its sums."""
        started = time.perf_counter()
        self._for_groups = None
        if len(users) == 0:
            return Upload()
        users = np.sort(np.asarray(users, dtype=np.int64))
        if self.config.model.fusion is not None:
            # clients ordered by size: the fusion module's per-client layers run one bmm per
            # contiguous range of similar clients (grouped.PaddedLayout). Clients are
            # independent, so the order changes nothing but the summation order of uploads.
            users = users[np.argsort(self.data.train_counts[users], kind="stable")]
        globals_ = {name: value.to(device=self.device, dtype=self.dtype) for name, value in global_params.items()}
        sums = _RoundSums(self.data.n_items)
        projections = self._span_projections(globals_)
        size = self.config.runtime.train_block_clients or len(users)
        # a fusion module's big per-step tensors reuse warm pages during the round; the free
        # heap goes back to the OS at its end (memory.py)
        with freed_memory_kept(self.config.model.fusion is not None):
            for start in range(0, len(users), size):
                block = users[start:start + size]
                self._train_block(round_, globals_, projections, block, lrs, teacher, sums)
                if progress is not None:
                    progress(len(block))
            del projections
            self._write_personal_tables(round_, global_params, sums)
            upload = sums.upload(self.features, self.config.privacy is not None)
            if sums.group_rows:
                self._for_groups = tuple(torch.cat(parts) for parts in zip(*sums.group_rows))
            del sums
        upload.seconds = time.perf_counter() - started
        return upload

    def _train_block(self, round_: int, globals_: dict[str, torch.Tensor], projections: dict[str, torch.Tensor],
                     users: np.ndarray, lrs: dict[str, float], teacher: TeacherDownload | None,
                     sums: "_RoundSums") -> None:
        """One block of a round's clients (Shard.train): train them, write their personal
        vectors, and add their upload contributions and pending table rows to `sums`."""
        model, train_cfg, device = self.model, self.config.train, self.device
        local = torch.as_tensor(self.store.local_index(users)).to(device)
        clients = client_data(self.data, users, neg_pool=train_cfg.neg_pool,
                              neg_exclude_heldout=train_cfg.neg_exclude_heldout)
        sort_device = device if device.type != "cpu" else None
        epochs = [epoch_rows(clients, neg_ratio=train_cfg.neg_ratio, rows_per_batch=train_cfg.rows_per_batch(),
                             seed=train_cfg.seed, round_=round_, epoch=e, sort_device=sort_device,
                             neg_draw=train_cfg.neg_draw)
                  for e in range(train_cfg.local_epochs)]
        del clients
        ws = WorkingSet.of(epochs, self.data.n_items)
        ws_client, ws_item = torch.as_tensor(ws.client).to(device), torch.as_tensor(ws.item).to(device)
        ws_local = local.index_select(0, ws_client)

        tables = {name: globals_[name].index_select(0, ws_item) for name in model.GLOBAL_TABLES}
        tables.update({name: self.store.table_rows(name, ws_local, ws_item) for name in model.PERSONAL_TABLES})
        vectors = {name: self.store.dense[name].index_select(0, local) for name in model.PERSONAL_DENSE}
        spans = self._spans(projections, ws, len(users))
        # copies of global weights: broadcast views (train_clients copies what it trains)
        vectors.update({name: globals_[name].expand(len(users), *globals_[name].shape)
                        for name in model.GLOBAL_DENSE if name not in spans})
        update = self.config.model.pfedrec_update if model.TWO_STEP_GROUPS else "joint"
        fusion = None
        if self.config.model.fusion is not None:
            fusion = FusionInputs(features=self.features, ws_client=ws.client, ws_item=ws.item, users=users,
                                  seed=train_cfg.seed, dropout=self.config.model.fusion.dropout,
                                  n_clients=len(users), span={span.modality: span for span in spans.values()})
            for span in spans.values():
                tables[span.table] = globals_[span.weight].new_zeros(len(ws.client), globals_[span.weight].shape[0])
                lrs = {**lrs, span.table: lrs[span.weight]}
        distil = self._distillation(teacher, users, local, ws) if teacher is not None else None
        # runtime.precision=bf16: the forward passes' matrix products in bfloat16 (autocast; the
        # parameters, their updates and the losses stay float32); fp32: autocast off, as without it
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            result = train_clients(model, ClientParams(tables, vectors), ws, epochs, lrs=lrs, tol=train_cfg.tol,
                                   round_=round_, model_config=self.config.model, update=update, fusion=fusion,
                                   distil=distil,
                                   schedule=StepSchedule(train_cfg.lr_batch_decay, train_cfg.weight_decay),
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
        # table rows the store keeps (personal tables, trained copies): written once per round
        kept = {name: trained.tables[name] for name in (*model.PERSONAL_TABLES, *self.store.copy_names)}
        if kept:
            sums.personal.append(_KeptRows(local, ws_local, ws_item, kept,
                                           {name: factor[name] for name in self.store.copy_names} if decayed else None))

        weights = torch.as_tensor(result.rows if model.AGGREGATION == "weighted" else np.ones(len(users)),
                                  dtype=self.dtype).to(device)
        if self.config.privacy is not None:  # uniform weights, each client's update scaled to norm <= clip
            squared = self._update_norms(trained, tables, vectors, result.last_grads, ws_client, len(users))
            weights = clip_factors(squared, self.config.privacy.clip)
            sums.clipped += int((weights < 1).sum())
        for name in model.GLOBAL_TABLES:
            start = tables[name]
            if decayed:  # a client's change = (f_c - 1) Q on every row + this correction on its rows
                start = start * factor[name].index_select(0, ws_client)[:, None]
                sums.add(sums.table_scale, name, float(((factor[name] - 1) * weights).sum()))
            delta = (trained.tables[name] - start).mul_(weights.index_select(0, ws_client)[:, None])
            sums.add_table(name, ws_item, delta)
        grads = model.UPLOAD_GRADS
        for name, span in spans.items():  # sum_c w_c dW_c = (w A)^T X[ws_item], summed per item first
            rows = result.last_grads[span.table] if name in grads else trained.tables[span.table]
            sums.add_span(name, span.modality, name in grads, ws_item, rows * weights[ws_client][:, None])
        for name in model.GLOBAL_DENSE:
            if name in spans:
                continue
            if name in grads:  # grad_adam: the last-batch gradient, not the trained weights
                grad = result.last_grads[name]
                sums.add(sums.grad, name, (grad * weights.view(-1, *[1] * (grad.dim() - 1))).sum(0))
                continue
            delta = trained.vectors[name] - vectors[name]
            sums.add(sums.dense, name, (delta * weights.view(-1, *[1] * (delta.dim() - 1))).sum(0))
        gfmfr = self.config.model.gfmfr
        if gfmfr is not None:
            if distil is not None:
                sums.distilled += int(distil.grouped.sum())
                if gfmfr.ema_scope == "client":
                    self.store.dense[RHO][local] = torch.as_tensor(distil.rho).to(self.store.dense[RHO].device)
                else:
                    final = distil.rho[~np.isnan(distil.rho)]
                    sums.rho = (sums.rho[0] + float(final.sum()), sums.rho[1] + len(final))
            sums.group_users.append(users)
            sums.group_vectors.append(flatten_vectors(model, trained.vectors, len(users)).cpu())
            if self.config.model.fusion is not None and self.config.model.fusion.fusion == "moe":
                sums.group_alpha.append(client_mixing(model, trained, ws, epochs, fusion).cpu())
            name = model.GROUP_TABLE  # client positions in upload order
            sums.group_rows.append((ws_client + sums.clients, ws_item, trained.tables[name] - tables[name]))
        sums.weight += float(weights.sum())
        sums.clients += len(users)
        sums.rows += int(result.rows.sum())
        sums.loss_sum += float(np.nansum(result.loss))

    def _write_personal_tables(self, round_: int, global_params: dict[str, torch.Tensor], sums: "_RoundSums") -> None:
        """The round's trained rows of personal tables and of kept copies, into the store at once
        (a SparseRows write merges with everything stored: once per round, not per block)."""
        if not sums.personal:
            return
        pieces, sums.personal = sums.personal, []
        local, ws_local, ws_item = (torch.cat([getattr(piece, field) for piece in pieces])
                                    for field in ("local", "ws_local", "ws_item"))
        trained = {name: torch.cat([piece.rows[name] for piece in pieces]) for name in pieces[0].rows}
        scale = None
        if pieces[0].scale is not None:  # weight decay: the factor of the rows each user did not touch
            scale = {name: torch.cat([piece.scale[name] for piece in pieces]) for name in pieces[0].scale}
        del pieces
        for name in self.model.PERSONAL_TABLES:
            self.store.write_table(name, ws_local, ws_item, trained[name])
        self.store.save_copies(round_, global_params, local, ws_local, ws_item, trained, scale=scale)

    def _update_norms(self, trained, tables: dict, vectors: dict, last_grads: dict, ws_client: torch.Tensor,
                      n_clients: int) -> torch.Tensor:
        """[B] squared L2 norm of each client's whole update (privacy.py): its changes to the global
        tables' rows it touched and to the global dense weights, or its last-batch gradients."""
        model = self.model
        grads = model.UPLOAD_GRADS
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

    def _span_projections(self, globals_: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """weight name -> [I, out] the frozen features projected by the global weight, for every
        projection this round holds as working-set spans (see _spans): computed once per round."""
        if self.config.privacy is not None:  # clipping needs each client's weight change
            return {}
        out = {}
        for modality, gram in self.grams.items():
            weight = f"fedmr.proj.{modality}.weight"
            if weight in self.model.GLOBAL_DENSE and len(gram) <= SPAN_ITEMS_PER_WIDTH * self.features[modality].shape[1]:
                out[weight] = torch.mm(self.features[modality], globals_[weight].T)
        return out

    def _spans(self, projections: dict[str, torch.Tensor], ws: WorkingSet, n_clients: int) -> dict[str, FeatureSpan]:
        """weight name -> FeatureSpan of the module's frozen-feature projections for the clients of
        `ws` (projections: _span_projections). Both forms are exact. Per row of client c, a span
        costs the Gram entries at c's working-set items (W_c <= I of them) and 2 W_c out
        multiply-adds; a weight copy costs the feature row (d entries), 4 d out multiply-adds
        (forward and weight gradient) and a per-client weight update per step. So a modality uses
        one when even a whole-catalogue working set costs no more, I <= 2 d (SPAN_ITEMS_PER_WIDTH):
        on KU (560 items, 512-d CLIP) both modalities do; on MovieLens (1,682 items) the 1,280-d
        images do and the 384-d text does not."""
        spans = {}
        for weight, projected in projections.items():
            modality = weight.split(".")[2]
            spans[weight] = FeatureSpan(modality=modality, weight=weight, table=f"fedmr.proj.{modality}.span",
                                        base=projected[torch.as_tensor(ws.item, device=projected.device)],
                                        gram=self.grams[modality],
                                        offsets=ws.offsets(n_clients))
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
        if candidates is not None:
            candidates = candidates.to(self.device)
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
                 ks: tuple[int, ...], users: np.ndarray | None = None,
                 with_items: bool = False) -> tuple[dict[str, float], int]:
        """Mean metrics over this shard's users (or `users`, a subset of them: a sampled evaluation)
        and their count (for a weighted reduce). with_items: also covered@k, the [I] bool items in
        these users' top-k lists, for the catalogue coverage of several shards together."""
        users = self.users if users is None else np.asarray(users, dtype=np.int64)
        if len(users) == 0:
            return {}, 0
        width = self.data.n_items if protocol != "p1" or self.negatives is None else 1 + self.negatives.test.shape[1]
        batch = max(1, _EVAL_ROW_BUDGET // width)  # the scorer splits its own work further
        covered = new_covered(self.data.n_items, ks)
        metrics = evaluate(self.scorer(global_params), self.data, protocol, split,
                           negatives=self.negatives, ks=ks, batch_users=batch, users=users, covered=covered)
        if with_items:
            metrics.update({f"covered@{k}": hit.numpy() for k, hit in covered.items()})
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
