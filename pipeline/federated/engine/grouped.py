"""Per-client linear layers over flat rows: every client applies its own weight to its rows.

Rows arrive grouped by client (contiguous). Clients are bucketed by row count (powers of two),
each bucket padded to its largest client and multiplied with one batched GEMM: padding wastes
at most 2x, however skewed the client sizes are (DESIGN "Flat, not padded": the fallback for
a per-client dense shape). Works for any dtype and width, with autograd.

A GroupPlan holds the bucket layout of one set of group sizes, so that many layers applied to
the same rows (the fusion module's projections, experts and router) compute it once.
"""

from __future__ import annotations

import numpy as np
import torch


class GroupPlan:
    """Bucket layout for groups of sizes `counts` [G] (rows of group g contiguous, in order)."""

    def __init__(self, counts: torch.Tensor):
        self.n_rows = int(counts.sum())
        device = counts.device
        starts = torch.cumsum(counts, 0) - counts
        group = torch.repeat_interleave(torch.arange(len(counts), device=device), counts)
        position = torch.arange(self.n_rows, device=device) - starts[group]
        bucket = torch.ceil(torch.log2(counts.clamp(min=1).to(torch.float64))).to(torch.int64)
        self.buckets = []  # (members [g], width, rows [n], slot of row [n], position of row [n])
        order = []
        for b in torch.unique(bucket).tolist():
            members = torch.nonzero(bucket == b).squeeze(1)  # groups in this bucket
            slot = torch.full((len(counts),), -1, dtype=torch.int64, device=device)
            slot[members] = torch.arange(len(members), device=device)
            rows = torch.nonzero(slot[group] >= 0).squeeze(1)
            width = int(counts[members].max())
            self.buckets.append((members, width, rows, slot[group[rows]], position[rows]))
            order.append(rows)
        self.inverse = torch.argsort(torch.cat(order))

    def apply(self, x: torch.Tensor, weight: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        """x [R, in], weight [G, out, in] (or [N, out, in] with `groups` [G] choosing the rows
        of weight that the G groups use). Returns [R, out] = x_r @ weight[group(r)].T."""
        pieces = []
        for members, width, rows, slot, position in self.buckets:
            padded = x.new_zeros(len(members), width, x.shape[1])
            padded = padded.index_put((slot, position), x[rows])
            chosen = weight[members] if groups is None else weight[groups[members]]
            out = torch.bmm(padded, chosen.transpose(1, 2))
            pieces.append(out[slot, position])
        return torch.cat(pieces)[self.inverse]


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x [R, in] (rows of group g contiguous, groups in order), weight [G, out, in],
    counts [G] rows per group (sum = R). Returns [R, out] = x_r @ weight[group(r)].T."""
    return GroupPlan(counts).apply(x, weight)


# --- padded layout: rows stored bucket-major, so per-client layers need no gathers -----------------


CLASSES_PER_OCTAVE = 4  # size classes per doubling of a PaddedLayout's client row counts


class PaddedLayout:
    """Rows of clients 0..B-1 laid out client after client, each client padded to the width of
    its bucket. Buckets are contiguous ranges of clients [c0, c1) whose row counts share a
    power-of-two class (the class made non-decreasing along the clients, so callers that order
    clients by size get tight buckets, and any order stays correct). A per-client Linear is then
    one bmm per bucket on views of the rows ([c1-c0, width, in]) and of the weights
    (weight[c0:c1]): no gather or scatter of rows or weights. Row-wise ops act on the flat
    [R', d] tensor directly. Padding rows repeat a real row of the same client (a client with
    no rows: any row); a loss never reads them, so they get zero gradient.

    client: [N] client of every input row (any order), n_clients: B.
    position [N]: where input row n lives; source [R']: which input row fills each padded row.
    buckets: (offset, c0, c1, width).
    """

    def __init__(self, client: np.ndarray, n_clients: int):
        client = np.asarray(client, dtype=np.int64)
        counts = np.bincount(client, minlength=n_clients)
        klass = np.maximum.accumulate(np.ceil(CLASSES_PER_OCTAVE * np.log2(np.maximum(counts, 1))).astype(np.int64))
        edges = np.flatnonzero(np.diff(klass)) + 1
        starts, stops = np.concatenate([[0], edges]), np.concatenate([edges, [n_clients]])
        width_of, base = np.zeros(n_clients, np.int64), np.zeros(n_clients, np.int64)
        self.buckets, offset = [], 0
        for c0, c1 in zip(starts.tolist(), stops.tolist()):
            width = int(max(counts[c0:c1].max(), 1))
            width_of[c0:c1] = width
            base[c0:c1] = offset + np.arange(c1 - c0) * width
            self.buckets.append((offset, c0, c1, width))
            offset += (c1 - c0) * width
        self.n_rows = offset
        order = np.argsort(client, kind="stable")
        first = np.cumsum(counts) - counts  # first sorted row of every client
        j = np.arange(len(client)) - np.repeat(first, counts)
        self.position = np.empty(len(client), dtype=np.int64)
        self.position[order] = base[client[order]] + j
        fill = np.where(counts > 0, order[np.minimum(first, max(len(client) - 1, 0))] if len(client) else 0, 0)
        source = np.repeat(fill, width_of)
        source[self.position] = np.arange(len(client))
        self.source = source
        self.real = np.zeros(self.n_rows, dtype=bool)
        self.real[self.position] = True
        self.row_client = np.repeat(np.arange(n_clients), width_of)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [R', in] in this layout, weight [B, out, in], bias [B, out] -> [R', out]."""
        return _PaddedLinear.apply(x, weight, bias, self)

    def affine(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor) -> torch.Tensor:
        """x [R', d] in this layout, weight and bias [B, d] (weight None: 1) -> x * weight + bias,
        every row with its client's vectors: per bucket on views, never broadcast to [R', d]."""
        return _Affine.apply(x, weight, bias, self)

    def broadcast(self, vector: torch.Tensor) -> torch.Tensor:
        """vector [B, ...] -> [R', ...]: every row gets its client's entry (by views; the
        backward is a sum over each client's rows, not a scatter)."""
        return _Broadcast.apply(vector, self)


def autocast_inputs(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The tensors as an autocast region would hand them to a matrix product: float32 ones cast
    to the region's lower dtype when autocast is on for their device (runtime.precision=bf16),
    else unchanged. A custom autograd Function's forward calls it itself, since autocast does not
    reach kernels called with out=; autograd casts the gradients back to the inputs' float32."""
    some = next(t for t in tensors if t is not None)
    device = some.device.type
    if not torch.is_autocast_enabled(device):
        return list(tensors)
    low = torch.get_autocast_dtype(device)
    return [t.to(low) if t is not None and t.dtype == torch.float32 else t for t in tensors]


class _PaddedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layout: PaddedLayout):
        x, weight, bias = autocast_inputs(x, weight, bias)
        out = x.new_empty(layout.n_rows, weight.shape[1])
        for offset, c0, c1, width in layout.buckets:
            rows = x[offset:offset + (c1 - c0) * width].view(c1 - c0, width, x.shape[1])
            target = out[offset:offset + (c1 - c0) * width].view(c1 - c0, width, -1)
            if bias is None:
                torch.bmm(rows, weight[c0:c1].transpose(1, 2), out=target)
            else:  # the bias added by the GEMM: no pass over the output
                torch.baddbmm(bias[c0:c1].unsqueeze(1), rows, weight[c0:c1].transpose(1, 2), out=target)
        ctx.layout = layout
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        grad_w = torch.empty_like(weight) if need_w else None  # every client is in one bucket
        grad_b = weight.new_empty(weight.shape[:2]) if need_b else None
        grad_out = grad_out.contiguous()
        grad_x = x.new_empty(x.shape) if need_x else None
        for offset, c0, c1, width in ctx.layout.buckets:
            span = slice(offset, offset + (c1 - c0) * width)
            go = grad_out[span].view(c1 - c0, width, grad_out.shape[1])
            if need_w:
                torch.bmm(go.transpose(1, 2), x[span].view(c1 - c0, width, x.shape[1]), out=grad_w[c0:c1])
            if need_b:  # padding rows carry zero gradient (no loss reads them)
                torch.sum(go, 1, out=grad_b[c0:c1])
            if need_x:
                torch.bmm(go, weight[c0:c1], out=grad_x[span].view(c1 - c0, width, -1))
        return grad_x, grad_w, grad_b, None


class _Affine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layout: PaddedLayout):
        x, weight, bias = autocast_inputs(x, weight, bias)
        out = torch.empty_like(x)
        for offset, c0, c1, width in layout.buckets:
            span = slice(offset, offset + (c1 - c0) * width)
            rows, target = x[span].view(c1 - c0, width, -1), out[span].view(c1 - c0, width, -1)
            if weight is None:
                torch.add(rows, bias[c0:c1].unsqueeze(1), out=target)
            else:
                torch.addcmul(bias[c0:c1].unsqueeze(1), rows, weight[c0:c1].unsqueeze(1), out=target)
        ctx.layout, ctx.n = layout, len(bias)
        ctx.has_weight = weight is not None
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = (torch.empty_like(grad) if ctx.has_weight else grad) if ctx.needs_input_grad[0] else None
        grad_w = weight.new_empty(weight.shape) if ctx.has_weight and ctx.needs_input_grad[1] else None
        grad_b = grad.new_empty(ctx.n, grad.shape[1]) if ctx.needs_input_grad[2] else None
        for offset, c0, c1, width in ctx.layout.buckets:
            span = slice(offset, offset + (c1 - c0) * width)
            g = grad[span].view(c1 - c0, width, -1)
            if grad_b is not None:  # padding rows carry zero gradient (no loss reads them)
                torch.sum(g, 1, out=grad_b[c0:c1])
            if grad_w is not None:
                torch.sum(g * x[span].view(c1 - c0, width, -1), 1, out=grad_w[c0:c1])
            if ctx.has_weight and grad_x is not None:
                torch.mul(g, weight[c0:c1].unsqueeze(1), out=grad_x[span].view(c1 - c0, width, -1))
        return grad_x, grad_w, grad_b, None


class _Broadcast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vector, layout: PaddedLayout):
        out = vector.new_empty(layout.n_rows, *vector.shape[1:])
        for offset, c0, c1, width in layout.buckets:
            view = out[offset:offset + (c1 - c0) * width].view(c1 - c0, width, *vector.shape[1:])
            view.copy_(vector[c0:c1].unsqueeze(1).expand_as(view))
        ctx.layout, ctx.n = layout, len(vector)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty(ctx.n, *grad.shape[1:])
        for offset, c0, c1, width in ctx.layout.buckets:
            torch.sum(grad[offset:offset + (c1 - c0) * width].view(c1 - c0, width, *grad.shape[1:]), 1,
                      out=out[c0:c1])
        return out, None


class _Gather(torch.autograd.Function):
    """source[index] whose backward is a segment sum (index_add_), faster than the
    accumulating index_put of advanced indexing on CPU; or, with sparse_grad, the rows' gradients
    as a sparse tensor (no pass over the rows that were not read)."""

    @staticmethod
    def forward(ctx, source, index, sparse_grad):
        ctx.save_for_backward(index)
        ctx.n, ctx.sparse_grad = len(source), sparse_grad
        return source.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        if ctx.sparse_grad:
            return row_sparse(index, grad, ctx.n), None, None
        out = grad.new_zeros(ctx.n, *grad.shape[1:]).index_add_(0, index, grad)
        return out, None, None


def gather_rows(source: torch.Tensor, index: torch.Tensor, sparse_grad: bool = False) -> torch.Tensor:
    """source[index] along dim 0 (index: int64 [R]). sparse_grad: source's gradient is a sparse
    tensor of the R rows read (uncoalesced), for a large table of which a step reads few rows;
    `table.sub_(grad, alpha=lr)` then touches only those rows (duplicates accumulate)."""
    return _Gather.apply(source, index, sparse_grad)


def row_sparse(index: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """The [n, ...] sparse tensor that is zero except rows[r] added at row index[r] (index [R])."""
    return torch.sparse_coo_tensor(index.unsqueeze(0), rows, (n, *rows.shape[1:]), check_invariants=False)
