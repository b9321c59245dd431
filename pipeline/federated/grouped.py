"""Per-client linear layers over flat rows: every client applies its own weight to its rows.

Rows arrive grouped by client (contiguous). Clients are bucketed by row count (powers of two),
each bucket padded to its largest client and multiplied with one batched GEMM: padding wastes
at most 2x, however skewed the client sizes are (DESIGN "Flat, not padded": the fallback for
a per-client dense shape). Works for any dtype and width, with autograd.
"""

from __future__ import annotations

import torch


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x [R, in] (rows of group g contiguous, groups in order), weight [G, out, in],
    counts [G] rows per group (sum = R). Returns [R, out] = x_r @ weight[group(r)].T."""
    starts = torch.cumsum(counts, 0) - counts
    group = torch.repeat_interleave(torch.arange(len(counts)), counts)
    position = torch.arange(len(x)) - starts[group]
    bucket = torch.ceil(torch.log2(counts.clamp(min=1).to(torch.float64))).to(torch.int64)
    pieces, order = [], []
    for b in torch.unique(bucket).tolist():
        members = torch.nonzero(bucket == b).squeeze(1)  # groups in this bucket
        slot = torch.full((len(counts),), -1, dtype=torch.int64)
        slot[members] = torch.arange(len(members))
        rows = torch.nonzero(slot[group] >= 0).squeeze(1)
        width = int(counts[members].max())
        padded = x.new_zeros(len(members), width, x.shape[1])
        padded = padded.index_put((slot[group[rows]], position[rows]), x[rows])
        out = torch.bmm(padded, weight[members].transpose(1, 2))
        pieces.append(out[slot[group[rows]], position[rows]])
        order.append(rows)
    result = torch.cat(pieces)
    return result[torch.argsort(torch.cat(order))]
