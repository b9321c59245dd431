"""A shard's evaluation scores as matrix products: a block of users against all items (P3) or
against each user's candidates only (P1). What the evaluator (pipeline/eval/protocols.py) ranks.

Linear-head models (FedAvg, FCF, PFedRec, FedRAP: the backbone declares ITEM_INPUT; with FedMR
the head scores z) give s(u, i) = w_u . r_{u,i} + b_u. Wherever user u holds no own row of a
personal item table at i, r_{u,i} is the row i of a table shared by a group of users (the global
table, FedRAP's base of P, the snapshot of Q a PFedRec user's copy was trained from), times a
per-user factor (weight decay). So a group's scores over all items are one product
[b, d] @ [d, I], over candidates a batched product of [b, C, d] rows with [b, d]; the (user,
item) pairs where the user holds an own row are scored exactly, one row each, and overwrite.

FedMR: r_{u,i} = z_{u,i} = sum_k alpha_uk f_k(e_{u,i}, t_i, v_i). The experts f_k are computed
once per item and group (the same e for the whole group), and per own pair; alpha_u from the
router at the user's mixing rows (history: its training positives; batch: its scored items),
which is all the method needs per (user, item) pair. Then s = [alpha_u1 w_u; alpha_u2 w_u;
alpha_u3 w_u] . [f_1(i); f_2(i); f_3(i)] + b_u: again one product per group.

FedNCF's tower is not a product, but its first layer and its GMF half are: tower.0 on
[m_u; q_i] is A m_u + B q_i + c (a [b, d0] and an [I, d0] product, added per pair), the GMF
term head_gmf . (m_u * q_i) is (m_u * head_gmf) @ Q^T; only the tower's later layers run per
(user, item) pair, on the candidates only under P1. With FedMR z_{u,i} = sum_k alpha_uk f_k(i)
enters both linearly. Every path works on sub-blocks of users whose rows fit a row budget, so
memory is bounded by the budget, not by the number of users.

Shapes: B = users of a block, I = items, C = candidates per user, d = item width, P = own pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.federated.engine.client import FusionRows
from pipeline.federated.engine.grouped import GroupPlan
from pipeline.models.base import backbone_of
from pipeline.models.fusion import GlobalItems, experts, mixing

if TYPE_CHECKING:
    from pipeline.federated.engine.shard import Shard

ROW_BUDGET = 1 << 21  # (user, item) pairs of a sub-block: scores, or rows of FedNCF's tower
ROW_BUDGET_FUSION = 1 << 17  # FedMR rows through the module or the router ([3 d_f] each)
ELEMENT_BUDGET = 1 << 23  # P1: gathered candidate rows x their width


def first_occurrence(items: torch.Tensor) -> torch.Tensor:
    """[B, C] bool: True at the first occurrence of each item in its row."""
    ordered, order = torch.sort(items, dim=1, stable=True)
    first = torch.ones_like(items, dtype=torch.bool)
    first.scatter_(1, order[:, 1:], ordered[:, 1:] != ordered[:, :-1])
    return first


@dataclass
class _View:
    """How the users of a block read item table `name` where they hold no own row:
    tables[group[u]] [I, d] times coef[u] (None: 1). own: (rows store, user mask [B]) of the
    personal rows that override it. keys: one hashable per table (caches per group)."""

    tables: list[torch.Tensor]
    keys: list[tuple]
    group: torch.Tensor
    coef: torch.Tensor | None
    own: list[tuple[object, torch.Tensor]]


class BlockScorer:
    """The scorer of a shard with given global parameters: users [B] -> [B, I] logits (P3) and
    score_candidates(users [B], items [B, C]) -> [B, C] logits (P1, items may repeat in a row)."""

    def __init__(self, shard, global_params: dict[str, torch.Tensor]):
        self.shard, self.model = shard, shard.model
        self.device, self.dtype = shard.device, shard.dtype
        self.globals = {name: value.to(device=self.device, dtype=self.dtype) for name, value in global_params.items()}
        self.n_items = shard.data.n_items
        self.fusion = self.model.FUSION
        self.backbone = backbone_of(self.model)
        self.moe = self.fusion is not None and self.fusion.fusion == "moe"
        self.batch_mixing = self.moe and self.fusion.mixing_source == "batch"
        self.ncf = self.backbone.FUSION_PLUG == "additive"  # FedNCF
        self.linear_head = bool(self.backbone.ITEM_INPUT)
        if self.fusion is not None and self.linear_head and (shard.store.table_scale or shard.store.copy_scale):
            self.linear_head = False  # a scaled ID input changes every expert (never with FedMR's configs)
        self._experts: dict[tuple, torch.Tensor] = {}  # group key -> [I, K d_f] expert outputs

    # -- the two entry points ---------------------------------------------------------------------

    def __call__(self, users: torch.Tensor) -> torch.Tensor:
        return self._blocks(users, None)

    def score_candidates(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self._blocks(users, torch.as_tensor(items, dtype=torch.int64))

    def _blocks(self, users: torch.Tensor, items: torch.Tensor | None) -> torch.Tensor:
        local = torch.as_tensor(self.shard.store.local_index(np.asarray(users))).to(self.device)
        width = self.n_items if items is None else items.shape[1]
        step = max(1, self._step(width, items is None))
        out = []
        with torch.no_grad():
            for start in range(0, len(local), step):
                part = None if items is None else items[start:start + step].to(self.device)
                block = local[start:start + step]
                if self.linear_head:
                    scores = self._matrix(block, part)
                elif self.ncf:
                    scores = self._ncf(block, part)
                else:
                    scores = self._rows(block, part)
                out.append(scores.cpu())
        if not out:
            return torch.zeros(0, width, dtype=self.dtype)
        return torch.cat(out)

    def _step(self, width: int, grid: bool) -> int:
        """Users per sub-block: the block's rows within the budget of the path."""
        if self.ncf:  # [b, width, d0] activations per tower layer (batch mixing: the router too)
            return (ROW_BUDGET_FUSION if self.batch_mixing and grid else ROW_BUDGET) // max(width, 1)
        if not self.linear_head:
            return (ROW_BUDGET if self.fusion is None else ROW_BUDGET_FUSION) // max(width, 1)
        if grid:  # the product writes the scores only (batch mixing: every pair through the router)
            return (ROW_BUDGET_FUSION if self.batch_mixing else ROW_BUDGET) // max(width, 1)
        k = self._width() if self.fusion is not None else self.shard.store.dense["w"].shape[1]
        return ELEMENT_BUDGET // max(width * k, 1)

    # -- FedNCF (and any model without ITEM_INPUT): rows ---------------------------------------------

    def _rows(self, local: torch.Tensor, items: torch.Tensor | None) -> torch.Tensor:
        if items is None:
            return self.model.logits(EvalRows(self.shard, self.globals, local)).view(len(local), self.n_items)
        row = torch.arange(len(local), device=self.device).repeat_interleave(items.shape[1])
        ctx = EvalRows(self.shard, self.globals, local, row, items.reshape(-1),
                       count=first_occurrence(items).reshape(-1))
        return self.model.logits(ctx).view(items.shape)

    # -- linear heads: products ---------------------------------------------------------------------

    def _view(self, name: str, local: torch.Tensor) -> _View:
        store, n = self.shard.store, len(local)
        zeros = torch.zeros(n, dtype=torch.int64, device=self.device)
        if name in store.tables:  # FedRAP's P_u: base + own rows, scaled per user
            coef = store.table_scale[name].index_select(0, local).to(self.dtype) if name in store.table_scale else None
            return _View([store.table_base[name]], [(name, "base")], zeros, coef,
                         [(store.tables[name], torch.ones(n, dtype=torch.bool, device=self.device))])
        if name in store.copies and self.shard.config.model.pfedrec_eval_table == "personal":
            rounds = store.copy_round.index_select(0, local)
            tables, keys, own = [], [], []
            group = torch.empty(n, dtype=torch.int64, device=self.device)
            for g, round_ in enumerate(torch.unique(rounds).tolist()):
                mine = rounds == round_
                group[mine] = g
                keys.append((name, round_))
                if round_ < 0:  # never trained: the current table
                    tables.append(self.globals[name])
                else:
                    tables.append(store.snapshots[round_][name].to(device=self.device, dtype=self.dtype))
                    own.append((store.copies[name][round_], mine))
            coef = None
            if name in store.copy_scale:
                scale = store.copy_scale[name].index_select(0, local).to(self.dtype)
                coef = torch.where(rounds >= 0, scale, torch.ones_like(scale))
            return _View(tables, keys, group, coef, own)
        return _View([self.globals[name]], [(name, "global")], zeros, None, [])

    def _own_grid(self, views: list[_View], local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row [P], item [P]) of the pairs of the block where a user holds an own row."""
        keys = []
        for view in views:
            for rows, mine in view.own:
                users = local[mine]
                row = torch.nonzero(mine).squeeze(1)
                lo = torch.searchsorted(rows.keys, users * self.n_items)
                hi = torch.searchsorted(rows.keys, (users + 1) * self.n_items)
                counts = hi - lo
                at = torch.repeat_interleave(lo - (torch.cumsum(counts, 0) - counts), counts)
                found = rows.keys[at + torch.arange(int(counts.sum()), device=self.device)]
                keys.append(torch.repeat_interleave(row, counts) * self.n_items + found % self.n_items)
        if not keys:
            empty = torch.zeros(0, dtype=torch.int64, device=self.device)
            return empty, empty
        keys = torch.unique(torch.cat(keys))
        return keys // self.n_items, keys % self.n_items

    def _own_candidates(self, views: list[_View], local: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """[B, C] bool: the candidate pairs where the user holds an own row."""
        row = torch.arange(len(local), device=self.device)[:, None].expand_as(items)
        keys = (local[:, None] * self.n_items + items).reshape(-1)
        own = torch.zeros(items.numel(), dtype=torch.bool, device=self.device)
        for view in views:
            for rows, mine in view.own:
                own |= rows.lookup(keys)[0] & mine[row].reshape(-1)
        return own.view(items.shape)

    def _matrix(self, local: torch.Tensor, items: torch.Tensor | None) -> torch.Tensor:
        dense = self.shard.store.dense
        w, b = dense["w"].index_select(0, local), dense["b"].index_select(0, local)
        views = [self._view(name, local) for name in self.backbone.ITEM_INPUT]
        if self.fusion is not None and "id" not in self.fusion.modalities:  # z does not read e
            own_row = own_item = own_col = torch.zeros(0, dtype=torch.int64, device=self.device)
        elif items is None:
            own_row, own_item = self._own_grid(views, local)
        else:
            own_mask = self._own_candidates(views, local, items)
            own_row, own_col = torch.nonzero(own_mask, as_tuple=True)
            own_item = items[own_row, own_col]
        if self.fusion is None:
            terms = self._id_terms(views, w)
            own_scores = self._own_id(local, own_row, own_item, w, b)
        else:
            terms, own_scores = self._fusion_terms(views, local, items, w, b, own_row, own_item)
        scores = self._products(terms, items, len(local)) + b[:, None]
        if len(own_row):
            if items is None:
                scores[own_row, own_item] = own_scores
            else:
                scores[own_row, own_col] = own_scores
        return scores

    def _products(self, terms, items: torch.Tensor | None, n: int) -> torch.Tensor:
        """sum of the terms (rows [b] of the block, U [b, k], V [I, k]): U V^T over all items
        or U . V[items] over each row's candidates."""
        width = self.n_items if items is None else items.shape[1]
        scores = torch.zeros(n, width, dtype=self.dtype, device=self.device)
        for rows, u, v in terms:
            if items is None:
                part = u @ v.T
            else:
                part = torch.bmm(v[items.index_select(0, rows)], u[:, :, None]).squeeze(2)
            scores.index_add_(0, rows, part)
        return scores

    def _id_terms(self, views: list[_View], w: torch.Tensor):
        terms = []
        for view in views:
            for g, table in enumerate(view.tables):
                rows = torch.nonzero(view.group == g).squeeze(1)
                u = w.index_select(0, rows)
                if view.coef is not None:
                    u = u * view.coef.index_select(0, rows)[:, None]
                terms.append((rows, u, table))
        return terms

    def _own_id(self, local, row, item, w, b) -> torch.Tensor:
        if not len(row):
            return w.new_zeros(0)
        rep = self.backbone.item_input(EvalRows(self.shard, self.globals, local, row, item))
        return (rep * w.index_select(0, row)).sum(-1) + b.index_select(0, row)

    # -- FedMR on a linear head ---------------------------------------------------------------------

    def _groups(self, views: list[_View], n: int) -> tuple[torch.Tensor, list[tuple]]:
        """(group [B] of every user, a key per group): users reading the same ID input tables."""
        if "id" not in self.fusion.modalities:
            return torch.zeros(n, dtype=torch.int64, device=self.device), [("no-id",)]
        stacked = torch.stack([view.group for view in views], 1)
        distinct, group = torch.unique(stacked, dim=0, return_inverse=True)
        keys = [tuple(view.keys[int(g)] for view, g in zip(views, combo)) for combo in distinct.tolist()]
        return group, keys

    def _group_experts(self, key: tuple, views: list[_View]) -> torch.Tensor:
        """[I, K d_f] the experts of every item with the ID input of group `key` (one key of each
        view: e = the sum of those tables), cached for the whole evaluation."""
        if key not in self._experts:
            e = None
            if "id" in self.fusion.modalities:
                e = sum(view.tables[view.keys.index(part)] for view, part in zip(views, key))
            ctx = GlobalItems(self.globals, self.shard.features, torch.arange(self.n_items, device=self.device))
            self._experts[key] = torch.cat(experts(ctx, e, self.fusion), -1)
        return self._experts[key]

    def _pair_experts(self, local, row, item, group, keys, views, own=None) -> torch.Tensor:
        """[R, K d_f] the experts at (row, item) pairs of the block: the group's per-item outputs,
        computed exactly where the user holds an own row (own [R] bool; None: looked up)."""
        out = torch.empty(len(row), self._width(), dtype=self.dtype, device=self.device)
        pair_group = group.index_select(0, row)
        for g, key in enumerate(keys):
            at = torch.nonzero(pair_group == g).squeeze(1)
            out[at] = self._group_experts(key, views).index_select(0, item.index_select(0, at))
        if "id" not in self.fusion.modalities:
            return out
        if own is None:
            pair_keys = local.index_select(0, row) * self.n_items + item
            own = torch.zeros(len(row), dtype=torch.bool, device=self.device)
            for view in views:
                for rows, mine in view.own:
                    own |= rows.lookup(pair_keys)[0] & mine.index_select(0, row)
        at = torch.nonzero(own).squeeze(1)
        if len(at):
            ctx = EvalRows(self.shard, self.globals, local, row.index_select(0, at), item.index_select(0, at))
            out[at] = torch.cat(experts(ctx, self.model.id_input(ctx), self.fusion), -1)
        return out

    def _width(self) -> int:
        return (3 if self.moe else 1) * self.fusion.d_f

    def _alpha(self, local, items, group, keys, views) -> torch.Tensor:
        """[B, 3] the users' mixing weights over their mixing rows."""
        n = len(local)
        if self.batch_mixing:
            if items is None:  # every item, once
                row = torch.arange(n, device=self.device).repeat_interleave(self.n_items)
                item = torch.arange(self.n_items, device=self.device).repeat(n)
                count = torch.ones(len(row), dtype=self.dtype, device=self.device)
            else:
                row = torch.arange(n, device=self.device).repeat_interleave(items.shape[1])
                item = items.reshape(-1)
                count = first_occurrence(items).reshape(-1).to(self.dtype)
            history = torch.zeros(len(row), dtype=torch.bool, device=self.device)
        else:  # the users' training positives
            data, users = self.shard.data, self.shard.store.users[local.cpu().numpy()]
            starts, stops = data.train_indptr[users], data.train_indptr[users + 1]
            counts = stops - starts
            offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
            row = torch.as_tensor(np.repeat(np.arange(n), counts)).to(self.device)
            item = torch.as_tensor(data.train_items[np.repeat(starts, counts) + offsets]).to(self.device)
            history = torch.ones(len(row), dtype=torch.bool, device=self.device)
            count = torch.zeros(len(row), dtype=self.dtype, device=self.device)
        outputs = self._pair_experts(local, row, item, group, keys, views).split(self.fusion.d_f, -1)
        rows = FusionRows(ctx=EvalRows(self.shard, self.globals, local, row, item), index=None, history=history,
                          count=count, segment=row, n_segments=n)
        return mixing(rows, list(outputs), self.fusion)

    def _fusion_terms(self, views, local, items, w, b, own_row, own_item):
        group, keys = self._groups(views, len(local))
        alpha = self._alpha(local, items, group, keys, views) if self.moe else None
        head = w if alpha is None else torch.cat([alpha[:, k, None] * w for k in range(3)], -1)
        terms = []
        for g, key in enumerate(keys):
            rows = torch.nonzero(group == g).squeeze(1)
            terms.append((rows, head.index_select(0, rows), self._group_experts(key, views)))
        own_scores = w.new_zeros(0)
        if len(own_row):
            outs = self._pair_experts(local, own_row, own_item, group, keys, views,
                                      own=torch.ones(len(own_row), dtype=torch.bool, device=self.device))
            own_scores = (outs * head.index_select(0, own_row)).sum(-1) + b.index_select(0, own_row)
        return terms, own_scores

    # -- FedNCF: the tower's first layer and the GMF half as products ---------------------------------

    def _ncf(self, local: torch.Tensor, items: torch.Tensor | None) -> torch.Tensor:
        g, dense, layers = self.globals, self.shard.store.dense, self.backbone.LAYERS
        user_mlp, user_mf = dense["user_mlp"].index_select(0, local), dense["user_mf"].index_select(0, local)
        d = user_mlp.shape[1]
        first = g[f"{layers[0]}.weight"]
        head = g["head.weight"][0]
        d_last = len(head) - d
        user_half = user_mlp @ first[:, :d].T + g[f"{layers[0]}.bias"]  # [b, d0]
        gmf_user = user_mf * head[d_last:]  # [b, d]: the GMF half of the head, per user
        tables = [g["item_mlp"]]  # [I, d] inputs of the item half, mixed per user by `mix`
        mf_tables = [g["item_mf"]]
        mix = None  # [b, K]: the weight of each table per user (None: one table, weight 1)
        if self.fusion is not None:
            outputs = self._ncf_experts(local, items)
            alpha = self._ncf_alpha(local, items) if self.moe else None
            tables += outputs
            mf_tables += outputs
            ones = torch.ones(len(local), 1, dtype=self.dtype, device=self.device)
            mix = torch.cat([ones, ones if alpha is None else alpha], 1)
        item_halves = [table @ first[:, d:].T for table in tables]  # [I, d0] each
        if items is None:
            hidden = user_half[:, None, :] + item_halves[0][None]
            gmf = gmf_user @ mf_tables[0].T
            for k in range(1, len(tables)):
                hidden = hidden + mix[:, k, None, None] * item_halves[k][None]
                gmf = gmf + mix[:, k, None] * (gmf_user @ mf_tables[k].T)
        else:
            hidden = user_half[:, None, :] + item_halves[0][items]
            gmf = torch.bmm(mf_tables[0][items], gmf_user[:, :, None]).squeeze(2)
            for k in range(1, len(tables)):
                hidden = hidden + mix[:, k, None, None] * item_halves[k][items]
                gmf = gmf + mix[:, k, None] * torch.bmm(mf_tables[k][items], gmf_user[:, :, None]).squeeze(2)
        hidden = torch.relu_(hidden)
        for layer in layers[1:]:
            hidden = torch.relu_(torch.nn.functional.linear(hidden, g[f"{layer}.weight"], g[f"{layer}.bias"]))
        return hidden @ head[:d_last] + gmf + g["head.bias"][0]

    def _ncf_experts(self, local, items) -> list[torch.Tensor]:
        """FedMR on FedNCF: the expert outputs [I, d_f] of every item (global ID table E)."""
        from pipeline.models.fusion import ID_TABLE

        key = ("ncf",)
        if key not in self._experts:
            e = self.globals[ID_TABLE] if "id" in self.fusion.modalities else None
            ctx = GlobalItems(self.globals, self.shard.features, torch.arange(self.n_items, device=self.device))
            self._experts[key] = torch.cat(experts(ctx, e, self.fusion), -1)
        return list(self._experts[key].split(self.fusion.d_f, -1))

    def _ncf_alpha(self, local, items) -> torch.Tensor:
        """[b, 3] FedNCF users' mixing weights (the experts do not depend on the user)."""
        group = torch.zeros(len(local), dtype=torch.int64, device=self.device)
        return self._alpha(local, items, group, [("ncf",)], [])  # the cached ("ncf",) outputs


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
        alpha_u whatever is scored; no item sees another) or the scored candidates (batch)."""
        data, users = self.shard.data, self.shard.store.users[self.user_local.cpu().numpy()]
        device = self.item.device
        starts, stops = data.train_indptr[users], data.train_indptr[users + 1]
        counts = stops - starts
        owner = torch.as_tensor(np.repeat(np.arange(len(users)), counts), device=device)
        offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        positives = torch.as_tensor(data.train_items[np.repeat(starts, counts) + offsets], device=device)
        dtype = next(iter(self.globals.values())).dtype
        if self.count is not None:
            count = self.count.to(dtype)
        elif self.candidates is None:
            count = torch.ones(len(self.item), dtype=dtype, device=device)
        else:
            count = self.candidates[self.row_user, self.item].to(dtype)
        if self.grid or not history:  # the grid holds every positive already
            trained = torch.zeros(len(users), data.n_items, dtype=torch.bool, device=device)
            trained[owner, positives] = True
            return FusionRows(ctx=self, index=None, history=trained[self.row_user, self.item], count=count,
                              segment=self.row_user, n_segments=len(self.user_local))
        # a subset of items is scored: the users' positives join as extra (mixing-only) rows
        n = len(self.item)
        ctx = EvalRows(self.shard, self.globals, self.user_local, torch.cat([self.row_user, owner]),
                       torch.cat([self.item, positives]), self.candidates)
        is_history = torch.cat([torch.zeros(n, dtype=torch.bool, device=device),
                                torch.ones(len(owner), dtype=torch.bool, device=device)])
        return FusionRows(ctx=ctx, index=torch.arange(n, device=device), history=is_history,
                          count=torch.cat([count, torch.zeros(len(owner), dtype=dtype, device=device)]),
                          segment=ctx.row_user, n_segments=len(self.user_local))
