"""Local training of many clients at once: one SGD step for all of them per mini-batch index.

Clients of a round are independent, so summing their per-client losses and differentiating
gives every client exactly its own gradient. Rows are flat (no padding): every row carries
its client's position; per-client means are segment sums. Item tables are trained on each
client's working set of touched rows only (DESIGN "Sparse item tables").

Shapes: B = clients, W = working-set rows (distinct (client, item) pairs), R = rows of a step.
Pure torch + numpy: no Ray here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.federated.engine.grouped import PaddedLayout, autocast_inputs, gather_rows, grouped_linear, row_sparse
from pipeline.federated.engine.sampling import EpochRows, dropout_scale, dropout_scale_on
from pipeline.models.base import broadcast_affine
from pipeline.models.group_fusion import kd_per_row, update_ratio_ema


_NUMPY_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}  # dropout multipliers made in numpy (CPU)
_BITMAP_KEYS = 1 << 28  # WorkingSet.of dedupes (client, item) keys with a bitmap up to this key space ...
_RANK_KEYS = 1 << 25  # ... and keeps the bitmap's int32 ranks (a gather for locate) up to this one


@dataclass(frozen=True)
class WorkingSet:
    """Distinct (client, item) pairs of a round, sorted. client, item: [W] int64.
    rank: optional [B * I] int64, key -> position (filled at members), for a fast locate."""

    client: np.ndarray
    item: np.ndarray
    n_items: int
    rank: np.ndarray | None = None

    @staticmethod
    def of(epochs: list[EpochRows], n_items: int) -> "WorkingSet":
        keys = np.concatenate([rows.client * n_items + rows.item for rows in epochs])
        space = (int(keys.max()) + 1) if len(keys) else 0
        if space > _BITMAP_KEYS:
            keys = np.unique(keys)
            return WorkingSet(client=keys // n_items, item=keys % n_items, n_items=n_items)
        seen = np.zeros(space, dtype=bool)  # a bitmap over every (client, item) pair: no sort
        seen[keys] = True
        rank = np.cumsum(seen, dtype=np.int32) - 1 if space <= _RANK_KEYS else None
        keys = np.flatnonzero(seen)
        return WorkingSet(client=keys // n_items, item=keys % n_items, n_items=n_items, rank=rank)

    def locate(self, client: np.ndarray, item: np.ndarray) -> np.ndarray:
        """[R] positions of (client, item) pairs in the working set (all must be members)."""
        if self.rank is not None:
            return self.rank[client * self.n_items + item].astype(np.int64)
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


@dataclass
class FusionInputs:
    """What a fusion module reads besides parameters during a round.

    features: modality -> [I, d_m] frozen item features.  ws_client, ws_item: [W] int64 of the
    working set.  users: [B] global user ids (they key the dropout masks, with `seed`).
    history: sorted working-set positions of the clients' training positives (set by
    train_clients).  key: (seed, round, epoch, step) of the current mini-batch.
    span: modality -> FeatureSpan for the frozen-feature projections held on the working set.
    """

    features: dict[str, torch.Tensor]
    ws_client: np.ndarray
    ws_item: np.ndarray
    users: np.ndarray
    seed: int
    dropout: float
    n_clients: int
    history: np.ndarray | None = None
    key: tuple[int, int, int, int] = (0, 0, 0, 0)
    span: dict[str, "FeatureSpan"] = field(default_factory=dict)

    def span_tables(self) -> dict[str, str]:
        """weight name -> the round table that stands for it (the frozen-feature projections held
        as working-set spans)."""
        return {span.weight: span.table for span in self.span.values()}

    def block(self, c0: int, c1: int, w0: int, w1: int) -> "FusionInputs":
        """The inputs of clients c0..c1-1 alone (working-set rows w0..w1-1), renumbered from 0."""
        span = {m: replace(s, base=s.base[w0:w1], offsets=s.offsets[c0:c1 + 1] - w0) for m, s in self.span.items()}
        return FusionInputs(features=self.features, ws_client=self.ws_client[w0:w1] - c0,
                            ws_item=self.ws_item[w0:w1], users=self.users[c0:c1], seed=self.seed,
                            dropout=self.dropout, n_clients=c1 - c0, span=span)


@dataclass
class Distillation:
    """GFMFR's distillation term for B clients in a round.

    teacher: [W] the client's teacher score s_{g(u)}[i] at every working-set row (NaN: the
    client has no group and trains on its own loss only).  grouped: [B] bool, the client has a
    teacher.  rho: [B] float64 loss-ratio EMA of every client (NaN: unset), updated in place
    once per mini-batch.  weight: a(t) this round.
    A client's loss is L_rec + rho_u a(t) L_KD, with rho_u updated from the batch's detached
    L_BCE / L_KD before the backward pass (PFedRec's second sub-step reuses it).
    """

    teacher: torch.Tensor
    grouped: np.ndarray
    rho: np.ndarray
    weight: float
    rho_max: float | None = None

    def block(self, c0: int, c1: int, w0: int, w1: int) -> "Distillation":
        """Clients c0..c1-1 alone; rho is a view (their updates land in this one)."""
        return Distillation(teacher=self.teacher[w0:w1], grouped=self.grouped[c0:c1], rho=self.rho[c0:c1],
                            weight=self.weight, rho_max=self.rho_max)

    def kappa(self, clients: np.ndarray, bce: torch.Tensor, kd: torch.Tensor, grouped: torch.Tensor,
              update: bool) -> torch.Tensor:
        """[P] kappa of `clients` (block positions) for this batch: rho * a(t), 0 without a group
        or with rho unset. update: first take the batch's ratio into rho (bce, kd: [P] detached
        means; grouped: [P] bool)."""
        if update:
            take = grouped.cpu().numpy()
            at = clients[take]
            self.rho[at] = update_ratio_ema(self.rho[at], bce.cpu().double().numpy()[take],
                                            kd.cpu().double().numpy()[take], self.rho_max)
        rho = np.nan_to_num(self.rho[clients], nan=0.0)
        kappa = torch.as_tensor(rho * self.weight, dtype=bce.dtype, device=bce.device)
        return torch.where(grouped, kappa, torch.zeros_like(kappa))


@dataclass
class FeatureSpan:
    """A Linear on frozen features, trained by SGD, held by its action on the working set.

    With frozen inputs x and plain SGD, every step changes client c's weight by
    -lr * sum_r g_r x_r^T over the rows r of the step, all working-set rows of c, so
    W_c = W + A_c^T X_c at all times (A_c: one coefficient row per working-set row of c,
    starting at 0). Its output on a row i of c is then
        W_c x_i = base_i + sum_{r in ws(c)} K[i, r] A_c[r],   base = X W^T, K = X X^T,
    exact, with no per-client [out, in] weight: the projection is needed only on the client's
    working-set rows (DESIGN "Sparse item tables", applied to the feature projections).

    modality: the features X.  weight: the parameter name (e.g. fedmr.proj.text.weight).
    table: the name of A in the round's tables ([W, out]).  base: [W, out] = X[ws_item] W^T of
    the downloaded W.  gram: [I, I] = X X^T.  offsets: [B+1] working-set rows per client.
    """

    modality: str
    weight: str
    table: str
    base: torch.Tensor
    gram: torch.Tensor
    offsets: np.ndarray


@dataclass
class FusionRows:
    """The rows a fusion module computes on for a forward call, and how they map back.

    ctx: a context over F distinct (client, item) rows: the scored rows plus, with `history`,
    the clients' training positives.  index: [R] position in F of every scored row (None: the
    scored rows are F).  history: [F] bool, row is a training positive of its client.
    count: [F] how many scored rows it stands for.  segment: [F] client of the row in
    0..n_segments-1 (mixing weights are per segment).
    """

    ctx: object
    index: torch.Tensor | None
    history: torch.Tensor
    count: torch.Tensor
    segment: torch.Tensor
    n_segments: int


class StepRows:
    """RowContext for the rows of one step: each row reads its own client's parameters.

    client: [R] client positions (sorted), ws: [R] working-set positions (None: every table
    holds exactly the step's rows, in order).
    fusion: FusionInputs when the model has a fusion module (see fusion_rows).
    """

    def __init__(self, params: dict[str, torch.Tensor], client: torch.Tensor, ws: torch.Tensor,
                 fusion: FusionInputs | None = None):
        self.params, self.client, self.ws = params, client, ws
        self.fusion = fusion
        self._groups = None

    def table(self, name: str) -> torch.Tensor:
        if self.ws is None:  # the tables hold the step's rows already
            return self.params[name]
        return gather_rows(self.params[name], self.ws, sparse_grad=True)

    def vector(self, name: str) -> torch.Tensor:
        return self.params[name].index_select(0, self.client)

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """Per-client Linear: rows are grouped by client (see grouped.py)."""
        weight = self.params[f"{name}.weight"]
        if weight.shape[1] == 1:  # a single output is a row-wise dot product
            return (x * weight[self.client, 0]).sum(-1, keepdim=True) + self.vector(f"{name}.bias")
        if self._groups is None:
            self._groups = torch.unique_consecutive(self.client, return_counts=True)
        present, counts = self._groups
        return grouped_linear(x, weight[present], counts) + self.vector(f"{name}.bias")

    def fusion_rows(self, history: bool) -> FusionRows:
        """The distinct (client, item) rows of this step, plus every training positive of the
        step's clients when `history` (S_u = H_u, in the same forward pass),
        in a padded layout (PaddedRows)."""
        info = self.fusion
        ws = self.ws.cpu().numpy()
        hist = info.history
        if history:
            present = np.zeros(info.n_clients, dtype=bool)
            present[self.client.cpu().numpy()] = True
            rows = np.unique(np.concatenate([ws, hist[present[info.ws_client[hist]]]]))
        else:
            rows = np.unique(ws)
        index = np.searchsorted(rows, ws)
        at = np.minimum(np.searchsorted(hist, rows), max(len(hist) - 1, 0))
        is_history = hist[at] == rows if len(hist) else np.zeros(len(rows), dtype=bool)
        count = np.bincount(index, minlength=len(rows))
        ctx = PaddedRows(self.params, info, info.ws_client[rows], rows, native=True)
        layout = ctx.layout
        dtype, device = ctx.dtype, ctx.device
        return FusionRows(ctx=ctx, index=torch.as_tensor(layout.position[index], device=device),
                          history=torch.as_tensor(is_history[layout.source] & layout.real, device=device),
                          count=torch.as_tensor(count[layout.source] * layout.real, dtype=dtype, device=device),
                          segment=ctx.client, n_segments=info.n_clients)


class PaddedRows:
    """The fusion module's context in local training: rows (client, working-set row) held in a
    PaddedLayout, so that every per-client Linear is one bmm per size bucket on views.

    native: the context's tensors are in padded order (R' rows, padding included: they repeat
    a real row of their client and are never read by the loss); else in the order of the rows
    given, and Linear layers move rows into the layout and back.
    The layout is planned on the host (numpy: client, ws); every tensor lives on the parameters'
    device.
    """

    def __init__(self, params: dict[str, torch.Tensor], fusion: FusionInputs, client: np.ndarray, ws: np.ndarray,
                 native: bool):
        self.params, self.fusion = params, fusion
        some = next(iter(params.values()))
        self.device, self.dtype = some.device, some.dtype
        self.layout = PaddedLayout(client, fusion.n_clients)
        if native:
            client, ws = self.layout.row_client, ws[self.layout.source]
            self._moves = None
        else:
            self._moves = (torch.as_tensor(self.layout.source, device=self.device),
                           torch.as_tensor(self.layout.position, device=self.device))
        self._client, self._ws = client, ws
        self.client, self.ws = torch.as_tensor(client, device=self.device), torch.as_tensor(ws, device=self.device)

    def table(self, name: str) -> torch.Tensor:
        return gather_rows(self.params[name], self.ws, sparse_grad=True)

    def vector(self, name: str) -> torch.Tensor:
        if self._moves is None:  # rows in the layout: a broadcast per bucket
            return self.layout.broadcast(self.params[name])
        return gather_rows(self.params[name], self.client)

    def affine(self, x: torch.Tensor, weight: str | None, bias: str) -> torch.Tensor:
        """models.base.broadcast_affine, per bucket (no [R, d] copies of the vectors) when the
        rows are in the layout."""
        if self._moves is None:
            return self.layout.affine(x, None if weight is None else self.params[weight], self.params[bias])
        return broadcast_affine(self, x, weight, bias)

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        weight, bias = self.params[f"{name}.weight"], self.params[f"{name}.bias"]
        if self._moves is None:
            return self.layout.linear(x, weight, bias)
        source, position = self._moves
        return self.layout.linear(x.index_select(0, source), weight, bias).index_select(0, position)

    def feature_linear(self, modality: str, name: str) -> torch.Tensor:
        """[R, out]: the rows' frozen `modality` features through the client's Linear `name`
        (held as a FeatureSpan when the round set one up: base + K A, no per-client weight)."""
        span = self.fusion.span.get(modality)
        if span is None or span.weight != f"{name}.weight":
            items = torch.as_tensor(self.fusion.ws_item[self._ws], device=self.device)
            return self.linear(self.fusion.features[modality].index_select(0, items), name)
        if self._moves is not None:
            raise ValueError("a FeatureSpan needs the native padded layout")
        moved = _SpanLinear.apply(self.params[span.table], self, span)
        return self.affine(moved.add_(span.base.index_select(0, self.ws)), None, f"{name}.bias")

    def dropout(self, x: torch.Tensor, site: int) -> torch.Tensor:
        """Inverted dropout on x [R, ...] with masks keyed by (key, user, item, site, unit)."""
        p = self.fusion.dropout
        if p == 0:
            return x
        flat = x.reshape(len(x), -1)
        users, items = self.fusion.users[self._client], self.fusion.ws_item[self._ws]
        dtype = torch.float32 if x.dtype == torch.bfloat16 else x.dtype  # bf16 rows: the float32 masks
        if x.device.type == "cpu":
            scale = torch.from_numpy(dropout_scale(*self.fusion.key, site, users, items, flat.shape[1], p,
                                                   dtype=_NUMPY_DTYPE[dtype]))
        else:  # the same masks, hashed on the device
            scale = dropout_scale_on(x.device, *self.fusion.key, site, users, items, flat.shape[1], p, dtype)
        return (flat * scale).view_as(x)

    def subset(self, index: torch.Tensor) -> "PaddedRows":
        """The rows `index` of this context, in that order."""
        index = index.cpu().numpy()
        return PaddedRows(self.params, self.fusion, self._client[index], self._ws[index], native=False)


_SPAN_CHUNK = 1 << 22  # Gram-row and span entries read at once (a bucket's clients are taken in chunks)


class _SpanLinear(torch.autograd.Function):
    """out_i = sum_{r in ws(c)} K[i, r] A[r] for the rows i of a native PaddedRows.

    Per chunk of a bucket's clients (consecutive, so of similar size: the engine orders clients
    by size), one bmm [g, width, W] @ [g, W, out]: the Gram entries between the rows' items and
    each client's own working-set items (W: the chunk's largest working set; a smaller one's
    extra columns meet zero span rows; gathered from the rows' whole Gram rows, which a chunk
    reads contiguously), against A_c's rows. 2 W_c out multiply-adds per row, against 4 d out
    for a per-client weight (see Shard._spans).
    Its backward returns, for A, the output gradient g_i at the rows' own working-set positions (a
    sparse tensor): then `A -= lr * grad` is exactly SGD on W_c (see FeatureSpan); it
    is not the gradient of A."""

    @staticmethod
    def forward(ctx, table, rows: "PaddedRows", span: FeatureSpan):
        (table,) = autocast_inputs(table)  # runtime.precision=bf16: the bmm below in bfloat16
        n_items, width_out = span.gram.shape[1], table.shape[1]
        out = table.new_empty(rows.layout.n_rows, width_out)
        ctx.save_for_backward(rows.ws)
        ctx.n = len(table)
        if len(table) == 0:  # no working set: every row is padding
            return out.zero_()
        device = table.device
        items = torch.as_tensor(rows.fusion.ws_item[rows._ws], device=device)
        sizes, offsets = np.diff(span.offsets), span.offsets
        for offset, c0, c1, width in rows.layout.buckets:
            a = c0
            while a < c1:  # clients [a, b): as many as keep their Gram rows and spans in the chunk
                most, b = max(int(sizes[a]), 1), a + 1
                while b < c1 and (b + 1 - a) * (width * n_items + max(most, sizes[b]) * width_out) <= _SPAN_CHUNK:
                    most, b = max(most, int(sizes[b])), b + 1
                g, at = b - a, offset + (a - c0) * width
                held = np.arange(most)[None, :] < sizes[a:b, None]  # [g, W]: a real working-set row
                ws = np.where(held, offsets[a:b, None] + np.arange(most)[None, :], 0).reshape(-1)
                spans = table.index_select(0, torch.as_tensor(ws, device=device)).view(g, most, width_out)
                spans.mul_(torch.as_tensor(held, device=device, dtype=table.dtype).unsqueeze(-1))
                columns = torch.as_tensor(rows.fusion.ws_item[ws], device=device).view(g, 1, most)
                gram_rows = span.gram.index_select(0, items[at:at + g * width]).view(g, width, n_items)
                entries = gram_rows.gather(2, columns.expand(g, width, most))
                torch.bmm(entries.to(table.dtype), spans, out=out[at:at + g * width].view(g, width, width_out))
                a = b
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (ws,) = ctx.saved_tensors
        return row_sparse(ws, grad_out, ctx.n), None, None


@dataclass
class LocalResult:
    """params: trained ClientParams.  rows: [B] rows processed (summed over epochs run).
    epochs: [B] epochs run.  loss: [B] mean batch loss of the last epoch run."""

    params: ClientParams
    rows: np.ndarray
    epochs: np.ndarray
    loss: np.ndarray
    last_grads: dict[str, torch.Tensor] = None  # model.UPLOAD_GRADS: last-batch gradients ([B, ...];
    # a FeatureSpan's under its table name, [W, out])
    table_decay: dict[str, np.ndarray] = None  # weight decay: table name -> [B] float64, the factor by
    # which every row outside the client's working set was multiplied this round (prod of 1 - lr wd)


@dataclass(frozen=True)
class StepSchedule:
    """What changes a client's SGD step besides its lr: lr x batch_decay^k at the client's k-th
    mini-batch of the round (k counted over its epochs), and SGD weight decay on every
    parameter the step trains (every row of a table, not only the rows of the step)."""

    batch_decay: float = 1.0
    weight_decay: float = 0.0

    @property
    def plain(self) -> bool:
        return self.batch_decay == 1.0 and self.weight_decay == 0.0


def client_losses(model, params: dict[str, torch.Tensor], client: torch.Tensor, ws: torch.Tensor,
                  label: torch.Tensor, n_clients: int, round_: int, model_config,
                  fusion: FusionInputs | None = None, distil=None) -> torch.Tensor:
    """[B] mean loss of each client over its rows of this step (0 for clients without rows).
    distil: (teacher [R] of the step's rows, NaN = no group; kappa(bce [B], kd [B], grouped [B])
    -> [B]): adds GFMFR's kappa_u * L_KD."""
    ctx = StepRows(params, client, ws, fusion)
    logit = model.logits(ctx)
    if logit.dtype == torch.bfloat16:  # runtime.precision=bf16: the loss and its reductions in float32
        logit = logit.float()
    bce = F.binary_cross_entropy_with_logits(logit, label, reduction="none")
    per_row = bce
    if model.row_regulariser is not None:
        per_row = per_row + model.row_regulariser(ctx, round_, model_config)
    counts = torch.bincount(client, minlength=n_clients).clamp(min=1)

    def mean(rows: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n_clients, dtype=rows.dtype, device=rows.device).index_add_(0, client, rows) / counts

    losses = mean(per_row)
    if distil is None:
        return losses
    teacher, kappa = distil
    has = ~torch.isnan(teacher)
    # a safe teacher where there is none: its rows are masked, and a NaN would reach the gradient
    kd = mean(kd_per_row(torch.sigmoid(logit), torch.where(has, teacher, 0.5)) * has)
    grouped = torch.zeros(n_clients, dtype=torch.int64, device=has.device).index_add_(0, client, has.long()) > 0
    return losses + kappa(mean(bce).detach(), kd.detach(), grouped) * kd


CHUNK_ROWS = 1 << 15  # rows of one local epoch per block of clients (see train_clients)


def train_clients(model, params: ClientParams, working_set: WorkingSet, epochs: list[EpochRows], *,
                  lrs: dict[str, float], tol: float, round_: int, model_config,
                  update: str = "joint", fusion: FusionInputs | None = None,
                  distil: Distillation | None = None, chunk_rows: int | None = CHUNK_ROWS,
                  schedule: StepSchedule = StepSchedule()) -> LocalResult:
    """Run local training of all clients in `params` (B of them) over the pre-sampled epochs.

    Clients are independent, so they are trained in blocks of consecutive clients of about
    `chunk_rows` rows per epoch (None: one block): a step's tensors then stay in the CPU's
    caches, which on a memory-bound step is worth more than one call for everyone (with a
    fusion module too: its many [rows, d_f] intermediates are streamed through memory once per
    layer). Results are the same for any blocking.
    distil: GFMFR's distillation term (its rho is updated in place).
    schedule: per-batch lr decay and weight decay (ID backbones only).
    """
    n_clients = len(next(iter(params.vectors.values())))
    if fusion is not None and not schedule.plain:
        raise NotImplementedError("per-batch lr decay and weight decay are not implemented for a fusion module")
    one_block = dict(lrs=lrs, tol=tol, round_=round_, model_config=model_config, update=update, schedule=schedule)
    if not epochs or chunk_rows is None:
        return _train_block(model, params, working_set, epochs, fusion=fusion, distil=distil, **one_block)
    per_client = np.bincount(epochs[0].client, minlength=n_clients)
    ends = np.cumsum(per_client)
    cuts = np.searchsorted(ends, np.arange(chunk_rows, ends[-1], chunk_rows), side="left") + 1
    bounds = np.unique(np.concatenate([[0], cuts, [n_clients]]))
    if len(bounds) <= 2:
        return _train_block(model, params, working_set, epochs, fusion=fusion, distil=distil, **one_block)
    ws_offsets = working_set.offsets(n_clients)
    # the trained parameters: every block trains in place on its slices of a copy of params
    tables = {k: v.detach().clone() for k, v in params.tables.items()}
    vectors = {k: v.detach().clone() for k, v in params.vectors.items()}
    rename = fusion.span_tables() if fusion is not None else {}
    everything = params.all()
    last_grads = {}  # per client ([B, ...]) or, for a span, per working-set row ([W, out])
    for name in model.UPLOAD_GRADS:
        value = everything[rename.get(name, name)]
        last_grads[rename.get(name, name)] = torch.zeros(value.shape, dtype=value.dtype, device=value.device)
    rows_done, epochs_run, loss = (np.zeros(n_clients, dtype=np.int64), np.zeros(n_clients, dtype=np.int64),
                                   np.full(n_clients, np.nan))
    table_decay = {name: np.ones(n_clients) for name in tables}
    for c0, c1 in zip(bounds[:-1], bounds[1:]):
        w0, w1 = ws_offsets[c0], ws_offsets[c1]
        rank = None if working_set.rank is None else (
            working_set.rank[c0 * working_set.n_items:c1 * working_set.n_items] - w0)
        block_ws = WorkingSet(client=working_set.client[w0:w1] - c0, item=working_set.item[w0:w1],
                              n_items=working_set.n_items, rank=rank)
        block_epochs = [_block_rows(rows, c0, c1) for rows in epochs]
        block_params = ClientParams({k: v[w0:w1] for k, v in tables.items()},
                                    {k: v[c0:c1] for k, v in vectors.items()})
        block_fusion = fusion.block(c0, c1, w0, w1) if fusion is not None else None
        block_distil = distil.block(c0, c1, w0, w1) if distil is not None else None
        result = _train_block(model, block_params, block_ws, block_epochs, fusion=block_fusion,
                              distil=block_distil, in_place=True, **one_block)
        for k in last_grads:
            last_grads[k][slice(w0, w1) if k in tables else slice(c0, c1)] = result.last_grads[k]
        rows_done[c0:c1], epochs_run[c0:c1], loss[c0:c1] = result.rows, result.epochs, result.loss
        for name, factor in result.table_decay.items():
            table_decay[name][c0:c1] = factor
    return LocalResult(params=ClientParams(tables, vectors), rows=rows_done, epochs=epochs_run, loss=loss,
                       last_grads=last_grads, table_decay=table_decay)


def history_rows(working_set: WorkingSet, epochs: list[EpochRows]) -> np.ndarray:
    """Sorted working-set positions of the clients' training positives (every epoch holds
    every positive once, so the first epoch's are all of them)."""
    first = epochs[0]
    return np.sort(working_set.locate(first.client[first.label == 1], first.item[first.label == 1]))


def client_mixing(model, params: ClientParams, working_set: WorkingSet, epochs: list[EpochRows],
                  fusion: FusionInputs) -> torch.Tensor:
    """[B, 3] every client's FedMR mixing weights alpha_u over its training positives H_u, in
    evaluation mode, with its trained parameters (GFMFR's upload)."""
    history = history_rows(working_set, epochs)
    inputs = replace(fusion, dropout=0.0, history=history)
    device = next(iter(params.vectors.values())).device
    ctx = StepRows(params.all(), torch.as_tensor(fusion.ws_client[history], device=device),
                   torch.as_tensor(history, device=device), inputs)
    with torch.no_grad():
        return model.mixing_weights(ctx)


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique of an already sorted array, without sorting it again."""
    if len(values) == 0:
        return values
    return values[np.concatenate([[True], values[1:] != values[:-1]])]


def _sparse_step(model, current: dict[str, torch.Tensor], table_names: set[str], group: tuple[str, ...],
                 client: np.ndarray, ws: torch.Tensor, label: torch.Tensor, present: np.ndarray,
                 lrs: dict[str, float], last_grads: dict[str, torch.Tensor], round_: int,
                 model_config, distil: Distillation | None = None, update_rho: bool = True,
                 scale: np.ndarray | None = None, decay: "_WeightDecay | None" = None) -> np.ndarray:
    """One SGD step of the parameters `group` for the clients `present` on the step's R rows,
    touching only what the step reads: every table as its R gathered rows, every per-client
    tensor as its P present clients. Updates `current` in place (scatter-add of -lr * grad;
    a row met twice in the step gets both contributions, as in the dense gradient).
    client: [R] client of each row (sorted), ws: [R] working-set rows.  scale: [P] lr factor of
    every present client (per-batch decay; None = 1).  decay: weight decay (None = off).
    Returns [P] losses."""
    device = ws.device
    present_t = torch.as_tensor(present).to(device)
    starts = np.empty(len(client), dtype=np.int64)  # [R] the row's client's position in present
    starts[:1] = 0
    np.not_equal(client[1:], client[:-1], out=starts[1:])
    slot = torch.as_tensor(np.cumsum(starts)).to(device)
    gathered = {name: value.index_select(0, ws if name in table_names else present_t)
                for name, value in current.items()}
    leaves = [name for name in group if name in gathered]
    for name in leaves:
        gathered[name].requires_grad_(True)
    kd = None
    if distil is not None:
        kd = (distil.teacher.index_select(0, ws),
              lambda bce, value, grouped: distil.kappa(present, bce, value, grouped, update_rho))
    losses = client_losses(model, gathered, slot, None, label, len(present), round_, model_config, distil=kd)
    grads = torch.autograd.grad(losses.sum(), [gathered[name] for name in leaves], allow_unused=True)
    with torch.no_grad():
        for name, grad in zip(leaves, grads):
            if grad is None:
                continue
            is_table = name in table_names
            at = ws if is_table else present_t
            if name in last_grads:
                last_grads[name].index_copy_(0, at, grad)
            if decay is not None:
                if is_table:  # every row of the present clients' tables: theta <- (1 - lr wd) theta
                    decay.shrink(current[name], name, present, lrs[name] * (1.0 if scale is None else scale))
                else:  # the gradient of wd/2 |theta|^2, at the values the loss saw
                    grad.add_(gathered[name].detach(), alpha=decay.weight_decay)
            if scale is not None:
                factor = torch.as_tensor(scale, dtype=grad.dtype, device=device)
                grad.mul_((factor.index_select(0, slot) if is_table else factor).view(-1, *[1] * (grad.dim() - 1)))
            current[name].index_add_(0, at, grad.mul_(-lrs[name]))  # (alpha= is several times slower)
    return losses.detach().cpu().numpy()


class _WeightDecay:
    """SGD weight decay on working-set tables: each step multiplies every working-set row of the
    present clients by (1 - lr wd), and records the factor per client (`factor`), by which every
    row outside the working set (never read this round) is multiplied too. Exact: a dense
    table's rows outside the working set get no gradient, only the decay."""

    def __init__(self, weight_decay: float, ws_client: np.ndarray, n_clients: int, tables):
        self.weight_decay, self.ws_client = weight_decay, ws_client
        self.factor = {name: np.ones(n_clients) for name in tables}

    def shrink(self, table: torch.Tensor, name: str, present: np.ndarray, lr) -> None:
        """table [W, d] of the block; present: [P] clients stepping with lr (a number or [P])."""
        shrink = 1.0 - np.asarray(lr, dtype=np.float64) * self.weight_decay
        self.factor[name][present] *= shrink
        per_client = np.ones(len(self.factor[name]))
        per_client[present] = shrink
        table.mul_(torch.as_tensor(per_client[self.ws_client], dtype=table.dtype, device=table.device)[:, None])


def _fusion_step(model, current: dict[str, torch.Tensor], group: tuple[str, ...], client: torch.Tensor,
                 ws: torch.Tensor, label: torch.Tensor, present: np.ndarray, n_clients: int,
                 lrs: dict[str, float], last_grads: dict[str, torch.Tensor], row_owner: dict[str, np.ndarray],
                 round_: int, model_config, fusion: FusionInputs, distil: Distillation | None = None,
                 update_rho: bool = True) -> np.ndarray:
    """One SGD step of `group` for a model with a fusion module, on the block's tensors (the
    module reads each client's training positives besides the step's rows, and its per-client
    layers are batched by size over the block's clients). Returns the [P] losses of the
    clients `present`."""
    leaves = {name: current[name].requires_grad_(True) for name in group}
    kd = None
    if distil is not None:
        every = np.arange(n_clients)  # (clients without rows in this step have no group in it)
        kd = (distil.teacher.index_select(0, ws),
              lambda bce, value, grouped: distil.kappa(every, bce, value, grouped, update_rho))
    losses = client_losses(model, current, client, ws, label, n_clients, round_, model_config, fusion, kd)
    grads = torch.autograd.grad(losses.sum(), list(leaves.values()), allow_unused=True)
    with torch.no_grad():
        for (name, leaf), grad in zip(leaves.items(), grads):
            leaf.requires_grad_(False)
            if grad is None:
                continue
            if name in last_grads:  # per client, or per working-set row of a span
                grad = grad.to_dense()
                at = np.isin(row_owner[name], present) if name in row_owner else present
                at = torch.as_tensor(at, device=grad.device)
                last_grads[name][at] = grad[at]
            # no temporary (the per-client fusion weights are large); a table's gradient is
            # sparse (StepRows/PaddedRows.table, _SpanLinear): only the step's rows are touched
            leaf.sub_(grad, alpha=lrs[name])
    return losses.detach().cpu().numpy()[present]


def _block_rows(rows: EpochRows, c0: int, c1: int) -> EpochRows:
    """The rows of clients c0..c1-1 (rows are grouped by client), clients renumbered from 0."""
    a, b = np.searchsorted(rows.client, [c0, c1])
    return EpochRows(client=rows.client[a:b] - c0, item=rows.item[a:b], label=rows.label[a:b],
                     batch=rows.batch[a:b], n_batches=rows.n_batches[c0:c1])


def _train_block(model, params: ClientParams, working_set: WorkingSet, epochs: list[EpochRows], *,
                 lrs: dict[str, float], tol: float, round_: int, model_config,
                 update: str = "joint", fusion: FusionInputs | None = None,
                 distil: Distillation | None = None, in_place: bool = False,
                 schedule: StepSchedule = StepSchedule()) -> LocalResult:
    """train_clients on one block of clients (all of `params`; in_place: train those tensors
    themselves, else copies).

    lrs: the lr of every parameter name this round (decay and item multipliers applied).
    update: 'joint' (one SGD step on everything per mini-batch) or 'two_step' (PFedRec:
    model.TWO_STEP_GROUPS stepped one after the other, the loss recomputed in between with
    the same dropout masks).
    fusion: the fusion module's inputs (models with one); its dropout keys are set per step.
    A client stops after epoch e >= 1 when |L_e - L_{e-1}| / (|L_e| + 1e-6) < tol.
    model.UPLOAD_GRADS (if any): each client's gradient of those parameters at its last
    mini-batch is returned in LocalResult.last_grads (for a weight held as a FeatureSpan: the
    span's rows of that mini-batch, keyed by the span's table name).
    """
    n_clients = len(next(iter(params.vectors.values())))
    current = {name: tensor.detach() if in_place else tensor.detach().clone() for name, tensor in params.all().items()}
    device, dtype = next(iter(current.values())).device, next(iter(current.values())).dtype
    if fusion is not None and epochs:
        fusion.history = history_rows(working_set, epochs)
    rename = fusion.span_tables() if fusion is not None else {}
    last_grads = {rename.get(n, n): torch.zeros_like(current[rename.get(n, n)])
                  for n in model.UPLOAD_GRADS}
    row_owner = {name: fusion.ws_client for name in rename.values()}  # span rows belong to clients
    if update == "two_step":  # spans stand for their weights
        groups = tuple(tuple(rename.get(n, n) for n in group if rename.get(n, n) in current)
                       for group in model.TWO_STEP_GROUPS)
    else:
        groups = (tuple(current),)
    table_names = set(params.tables)
    decay = (_WeightDecay(schedule.weight_decay, working_set.client, n_clients, table_names)
             if schedule.weight_decay > 0 else None)
    active = np.ones(n_clients, dtype=bool)
    rows_done = np.zeros(n_clients, dtype=np.int64)
    epochs_run = np.zeros(n_clients, dtype=np.int64)
    previous = last = np.full(n_clients, np.nan)
    for epoch, rows in enumerate(epochs):
        ws_index = working_set.locate(rows.client, rows.item)
        loss_sum = np.zeros(n_clients)
        n_batches = np.zeros(n_clients, dtype=np.int64)
        # the active rows, step by step (rows of a step stay in client order)
        by_step = np.argsort(rows.batch, kind="stable")
        by_step = by_step[active[rows.client[by_step]]]
        step_bounds = np.searchsorted(rows.batch[by_step], np.arange(int(rows.n_batches.max(initial=0)) + 1))
        for step in range(int(rows.n_batches[active].max(initial=0))):
            chosen = by_step[step_bounds[step]:step_bounds[step + 1]]
            ws = torch.as_tensor(ws_index[chosen]).to(device)
            label = torch.as_tensor(rows.label[chosen]).to(device=device, dtype=dtype)
            present = _sorted_unique(rows.client[chosen])
            if fusion is not None:
                fusion.key = (fusion.seed, round_, epoch, step)
            scale = None  # the present clients' k-th step of the round: lr x batch_decay^k
            if schedule.batch_decay != 1.0:
                scale = schedule.batch_decay ** (epoch * rows.n_batches[present] + step).astype(np.float64)
            for index, group in enumerate(groups):
                if fusion is None:
                    losses = _sparse_step(model, current, table_names, group, rows.client[chosen], ws,
                                          label, present, lrs, last_grads, round_, model_config,
                                          distil=distil, update_rho=index == 0, scale=scale, decay=decay)
                else:
                    client = torch.as_tensor(rows.client[chosen], device=device)
                    losses = _fusion_step(model, current, group, client, ws, label, present, n_clients, lrs,
                                          last_grads, row_owner, round_, model_config, fusion,
                                          distil=distil, update_rho=index == 0)
                if index == 0:  # the epoch loss is the batch loss before any update
                    loss_sum[present] += losses
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
    table_decay = decay.factor if decay is not None else {name: np.ones(n_clients) for name in params.tables}
    return LocalResult(params=trained, rows=rows_done, epochs=epochs_run, loss=last, last_grads=last_grads,
                       table_decay=table_decay)
