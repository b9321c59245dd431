"""GFMFR's math, pure torch: group targets (the pools' per-group sums, the
server's means), the group fusion model f_phi trained to regress them, and the clients'
distillation term with its adaptive weight (teacher heads: each backbone's teacher_logits).

Shapes: G = groups, N = items, d_c = target width, P = participants, W = uploaded table rows.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.models.base import xavier

PROB_CLAMP = 1e-7
KD_SCHEDULES = ("cosine", "linear_increase", "exponential_increase", "constant")
EMA_DECAY = 0.9


# --- group targets ---------------------------------------------------------------------------------


def group_delta_sums(delta: torch.Tensor, row_client: torch.Tensor, row_item: torch.Tensor,
                     client_group: torch.Tensor, n_groups: int, n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums [G, N, d], members [G]): each group's sum of its members' changes to a table
    (delta [W, d] at (row_client [W], row_item [W]); client_group [P] group id of each client,
    -1: none, ignored). What a pool reduces its clients' uploads to; sums over pools add up."""
    grouped = client_group >= 0
    members = torch.bincount(client_group[grouped], minlength=n_groups)
    # the rows of ungrouped clients go to one spare row past the G N sums, dropped after: no
    # copy of the grouped rows of delta, and every (group, item) sum adds the same rows in the
    # same order as summing the grouped rows alone (index_add_ adds in row order)
    group = client_group[row_client]
    keys = torch.where(group >= 0, group * n_items + row_item, n_groups * n_items)
    sums = delta.new_zeros(n_groups * n_items + 1, delta.shape[1]).index_add_(0, keys, delta)
    return sums[:-1].view(n_groups, n_items, -1), members


def targets_from_sums(global_table: torch.Tensor, sums: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """C̄ [G, N, d] = global_table + sums / members (empty groups: the global table)."""
    return global_table[None] + sums / members.clamp(min=1).to(sums.dtype)[:, None, None]


def target_scale(targets: torch.Tensor, members: torch.Tensor, how: str) -> float:
    """What the group fusion model's targets [G, N, d] are divided by before its fit (its tables
    multiplied by after): 1 for how='none'; for 'rms' their root mean square over the non-empty
    groups (1 when that is 0), so SGD at a fixed lr sees unit-size targets whatever the tables' size."""
    if how == "none":
        return 1.0
    if how != "rms":
        raise ValueError(f"server_target_scale {how!r}: expected 'none' or 'rms'")
    rms = float(targets[members.to(targets.device) > 0].double().square().mean().sqrt())
    return rms if rms > 0 and math.isfinite(rms) else 1.0


# --- group fusion model ---------------------------------------------------------------------------


class GroupFusion(torch.nn.Module):
    """z_{g,i} = Fuse(A_id e_g + a_id, A_t t_i + a_t, A_v v_i + a_v) in R^{d_c}.

    fusion: mlp (Linear(3 d_c -> 2 d_c), ReLU, Linear(2 d_c -> d_c); the default) or sum.
    feature_dims: modality -> width of the frozen item features (absent modalities dropped).
    """

    def __init__(self, n_groups: int, d_c: int, feature_dims: dict[str, int], group_dim: int = 512,
                 fusion: str = "mlp", generator: torch.Generator | None = None):
        super().__init__()
        if fusion not in ("mlp", "sum"):
            raise ValueError(f"group_fusion {fusion!r}: this version has 'mlp' and 'sum'")
        generator = generator or torch.Generator().manual_seed(0)
        self.fusion, self.modalities = fusion, tuple(m for m in ("text", "image") if m in feature_dims)
        self.group = torch.nn.Parameter(xavier((n_groups, group_dim), generator))
        self.proj = torch.nn.ModuleDict({"id": self._linear(group_dim, d_c, generator)})
        for m in self.modalities:
            self.proj[m] = self._linear(feature_dims[m], d_c, generator)
        if fusion == "mlp":
            width = (1 + len(self.modalities)) * d_c
            self.fc1 = self._linear(width, 2 * d_c, generator)
            self.fc2 = self._linear(2 * d_c, d_c, generator)

    @staticmethod
    def _linear(fan_in: int, fan_out: int, generator: torch.Generator) -> torch.nn.Linear:
        layer = torch.nn.Linear(fan_in, fan_out)
        with torch.no_grad():
            layer.weight.copy_(xavier((fan_out, fan_in), generator))
            layer.bias.zero_()
        return layer

    def forward(self, groups: torch.Tensor, items: torch.Tensor, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """groups, items [B] -> z [B, d_c]."""
        parts = [self.proj["id"](self.group[groups])]
        parts += [self.proj[m](features[m][items]) for m in self.modalities]
        if self.fusion == "sum":
            return torch.stack(parts).sum(0)
        return self.fc2(torch.relu(self.fc1(torch.cat(parts, -1))))

    def tables(self, features: dict[str, torch.Tensor], n_items: int) -> torch.Tensor:
        """Z [G, N, d_c] of every group at once, in eval mode (on the model's device): what
        `table` gives group by group, with each projection computed once (the items' for all
        groups, the groups' for all items) and fc1 split by the concatenation's parts, so the
        [G, N] grid only sees the sums, fc2 and the ReLU."""
        with torch.no_grad():
            by_group = self.proj["id"](self.group)  # [G, d_c]
            by_item = [self.proj[m](features[m][:n_items]) for m in self.modalities]  # [N, d_c] each
            if self.fusion == "sum":
                return by_group[:, None] + torch.stack(by_item).sum(0)[None]
            d_c = by_group.shape[1]
            weights = self.fc1.weight.split(d_c, 1)  # the columns of each part of the concatenation
            group_part = torch.addmm(self.fc1.bias, by_group, weights[0].T)  # [G, 2 d_c]
            item_part = sum(x @ w.T for x, w in zip(by_item, weights[1:]))  # [N, 2 d_c]
            hidden = torch.relu(group_part[:, None] + item_part[None])
            return self.fc2(hidden)

    def table(self, group: int, features: dict[str, torch.Tensor], n_items: int) -> torch.Tensor:
        """Z_g [N, d_c] of one group, in eval mode (on the model's device)."""
        with torch.no_grad():
            items = torch.arange(n_items, device=self.group.device)
            return self(torch.full((n_items,), group, dtype=torch.int64, device=self.group.device), items, features)


def _fusion_pairs(members: torch.Tensor, n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(group [P], item [P]) of every (g, i) pair of the non-empty groups, group-major (CPU)."""
    groups = torch.nonzero(members.cpu() > 0).squeeze(1)
    return groups.repeat_interleave(n_items), torch.arange(n_items).repeat(len(groups))


def _converged(losses: list[float], tol: float | None) -> bool:
    """Early stop (tol set): the last epoch lowered the mean loss by at most tol of the one before."""
    return tol is not None and len(losses) > 1 and losses[-2] - losses[-1] <= tol * abs(losses[-2])


def train_group_fusion(model: GroupFusion, targets: torch.Tensor, members: torch.Tensor,
                       features: dict[str, torch.Tensor], *, epochs: int = 50, lr: float = 0.01,
                       weight_decay: float = 1e-4, batch: int = 256, seed: int = 0, tol: float | None = None,
                       block_values: int = 1 << 22) -> list[float]:
    """Regress C̄_g[i] (targets [G, N, d_c]) on all (g, i) pairs of the non-empty groups with
    MSE (mean reduction), a fresh SGD each call (warm start of the model), shuffled batches
    seeded by `seed`. Returns the mean training loss of every epoch.

    tol (None: every epoch): stop after the first epoch that lowers the mean loss by at most
    tol x the previous epoch's (model.gfmfr.server_tol).

    The same steps as reference.group_fusion.train_group_fusion_reference (autograd +
    torch.optim.SGD; equal up to float rounding, pinned by the tests), written out by hand on the
    model's device with fewer operations per batch: the parameters live in one flat buffer (one SGD update of two
    operations, the mean's factor 2 / numel folded into it), the gradients are the MLP's, derived
    by hand (no autograd graph); the group embedding goes through its projection once per batch
    for the G groups ([G, d_c], then gathered) instead of once per pair; each epoch gathers its
    shuffled feature rows and targets into preallocated buffers, block_values values at a time,
    instead of every batch indexing (and allocating) its own; the loss is read once per epoch."""
    named = dict(model.named_parameters())
    modalities, mlp = model.modalities, model.fusion == "mlp"
    names = ["group", "proj.id.weight", "proj.id.bias",
             *[f"proj.{m}.{k}" for m in modalities for k in ("weight", "bias")],
             *(["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"] if mlp else [])]
    if sorted(names) != sorted(named):
        raise ValueError(f"train_group_fusion: unexpected parameters {sorted(named)}")
    device, dtype = model.group.device, model.group.dtype
    sizes = [named[n].numel() for n in names]
    flat = torch.cat([named[n].detach().reshape(-1) for n in names])
    grad = torch.zeros_like(flat)
    w = {n: t.view(named[n].shape) for n, t in zip(names, flat.split(sizes))}
    gw = {n: t.view(named[n].shape) for n, t in zip(names, grad.split(sizes))}
    wt = {n: t.T for n, t in w.items() if t.dim() == 2}  # views: follow the updates in place

    n_groups, n_items, d_c = targets.shape
    pair_group, pair_item = _fusion_pairs(members, n_items)
    n_pairs = len(pair_group)
    flat_targets = targets.reshape(n_groups * n_items, d_c).to(device, dtype)
    feats = {m: features[m].to(device, dtype) for m in modalities}
    width = d_c + sum(x.shape[1] for x in feats.values())
    rows = max(batch, block_values // width // batch * batch)  # pairs gathered at a time, whole batches
    buf_y = flat_targets.new_empty(min(rows, n_pairs), d_c)
    buf_x = {m: x.new_empty(min(rows, n_pairs), x.shape[1]) for m, x in feats.items()}
    id_grad = flat.new_empty(w["group"].shape[0], d_c)  # the model's groups (targets may have fewer)
    batch_sizes = [min(batch, n_pairs - s) for s in range(0, n_pairs, batch)]
    batch_loss = flat.new_empty(len(batch_sizes))  # each batch's sum of squared errors
    decay = 1.0 - lr * weight_decay
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    with torch.no_grad():
        for _ in range(epochs):
            order = torch.randperm(n_pairs, generator=generator)
            groups_all, items_all = pair_group[order].to(device), pair_item[order].to(device)
            keys_all = groups_all * n_items + items_all
            step = 0
            for b0 in range(0, n_pairs, rows):
                block_groups = groups_all[b0:b0 + rows]
                n_block = len(block_groups)
                y_block = torch.index_select(flat_targets, 0, keys_all[b0:b0 + rows], out=buf_y[:n_block])
                x_block = [torch.index_select(feats[m], 0, items_all[b0:b0 + rows], out=buf_x[m][:n_block])
                           for m in modalities]
                for s in range(0, n_block, batch):
                    g, y = block_groups[s:s + batch], y_block[s:s + batch]
                    xs = [x[s:s + batch] for x in x_block]
                    # forward
                    id_table = torch.addmm(w["proj.id.bias"], w["group"], wt["proj.id.weight"])  # [G, d_c]
                    parts = [id_table.index_select(0, g)]
                    parts += [torch.addmm(w[f"proj.{m}.bias"], x, wt[f"proj.{m}.weight"])
                              for m, x in zip(modalities, xs)]
                    if mlp:
                        fused = torch.cat(parts, 1)
                        pre = torch.addmm(w["fc1.bias"], fused, wt["fc1.weight"])
                        hidden = torch.relu(pre)
                        z = torch.addmm(w["fc2.bias"], hidden, wt["fc2.weight"])
                    else:
                        z = torch.stack(parts).sum(0)
                    diff = z.sub_(y).view(-1)
                    torch.dot(diff, diff, out=batch_loss[step])
                    diff = diff.view(z.shape)
                    # backward, up to the mean's factor 2 / numel (folded into the SGD step)
                    if mlp:
                        torch.mm(diff.T, hidden, out=gw["fc2.weight"])
                        torch.sum(diff, 0, out=gw["fc2.bias"])
                        dpre = torch.ops.aten.threshold_backward(diff @ w["fc2.weight"], pre, 0)
                        torch.mm(dpre.T, fused, out=gw["fc1.weight"])
                        torch.sum(dpre, 0, out=gw["fc1.bias"])
                        dparts = (dpre @ w["fc1.weight"]).split(d_c, 1)
                    else:
                        dparts = [diff] * len(parts)
                    for m, x, dx in zip(modalities, xs, dparts[1:]):
                        torch.mm(dx.T, x, out=gw[f"proj.{m}.weight"])
                        torch.sum(dx, 0, out=gw[f"proj.{m}.bias"])
                    id_grad.zero_().index_add_(0, g, dparts[0])  # the batch's rows summed per group
                    torch.mm(id_grad.T, w["group"], out=gw["proj.id.weight"])
                    torch.sum(id_grad, 0, out=gw["proj.id.bias"])
                    torch.mm(id_grad, w["proj.id.weight"], out=gw["group"])
                    # SGD as torch.optim.SGD without momentum: p -= lr (grad + weight_decay p)
                    if weight_decay:
                        flat.mul_(decay)
                    flat.add_(grad, alpha=-lr * 2.0 / z.numel())
                    step += 1
            total = 0.0
            for value, size in zip(batch_loss.tolist(), batch_sizes):
                total += value / (size * d_c) * size  # the batch's mean loss x its pairs
            losses.append(total / max(n_pairs, 1))
            if _converged(losses, tol):
                break
        for n in names:
            named[n].copy_(w[n])
    model.eval()
    return losses


# --- client distillation --------------------------------------------------------------------------


def kd_per_row(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """[R] KL(q || p̂) of the two-class distributions q = [s, 1-s] (teacher) and p̂ = [ŷ, 1-ŷ]
    (student probabilities), both clamped to [1e-7, 1]; a client's L_KD is its rows' mean."""
    q = torch.stack([teacher, 1 - teacher], -1).clamp(PROB_CLAMP, 1.0)
    p = torch.stack([student, 1 - student], -1).clamp(PROB_CLAMP, 1.0)
    return (q * (q.log() - p.log())).sum(-1)


def kd_schedule(kind: str, round_: int, rounds: int) -> float:
    """a(t): cosine cos(pi t / 2T) (default), linear_increase t/T, exponential_increase
    1 - exp(-t/10), constant 1; T = the configured rounds, t the 0-based round."""
    if kind == "cosine":
        return math.cos(math.pi * round_ / (2 * rounds))
    if kind == "linear_increase":
        return round_ / rounds
    if kind == "exponential_increase":
        return 1 - math.exp(-round_ / 10)
    if kind == "constant":
        return 1.0
    raise ValueError(f"kd_schedule {kind!r}: expected one of {KD_SCHEDULES}")


def update_ratio_ema(rho: np.ndarray, bce: np.ndarray, kd: np.ndarray, rho_max: float | None = None) -> np.ndarray:
    """Per-client EMA of r = L_BCE / (L_KD + 1e-8) (detached scalars of one mini-batch; arrays [B]):
    rho unset (NaN) takes r, else 0.9 rho + 0.1 r; no update where L_KD <= 1e-8; rho >= 0 (and
    <= rho_max, a project option)."""
    ratio = bce / (kd + 1e-8)
    updated = np.where(np.isnan(rho), ratio, EMA_DECAY * rho + (1 - EMA_DECAY) * ratio)
    updated = np.maximum(updated, 0.0) if rho_max is None else np.clip(updated, 0.0, rho_max)
    return np.where(kd > 1e-8, updated, rho)
