"""Textbook one-client-at-a-time federated trainer: the test oracle of the vectorised engine.

Written from spec/backbones.md alone, deliberately naive: every client holds dense full
tensors (personal item tables as [I, d]), trains with `torch.optim.SGD` and autograd, one
mini-batch at a time, and the server averages full tensors. Nothing here imports the math
of pipeline/models/*.py or pipeline/federated/client.py; the only shared pieces are the
seeded initial model, the participant stream and the row sampler (shared randomness, not
math), so both sides see the same clients, rows and starting point.

Shapes: I = items, d = dim, U = users, R = rows of a mini-batch.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from pipeline.config import ExperimentConfig
from pipeline.data.prepare import PreparedDataset
from pipeline.federated.aggregate import initial_state, participants
from pipeline.federated.sampling import client_data, epoch_rows

# --- what each backbone downloads/uploads and keeps (spec/backbones.md §6) ----------------------

GLOBAL_NAMES = {
    "fedavg": ("item",),
    "fcf": ("item",),
    "pfedrec": ("item",),
    "fedrap": ("item_global",),
    "fedncf": ("item_mf", "item_mlp", "tower.0.weight", "tower.0.bias", "tower.1.weight", "tower.1.bias",
               "tower.2.weight", "tower.2.bias", "head.weight", "head.bias"),
}
PERSONAL_NAMES = {
    "fedavg": ("w", "b"),
    "fcf": ("w", "b"),
    "pfedrec": ("w", "b"),  # + "item" (Q~_u) once the user has trained
    "fedrap": ("item_personal", "w", "b"),
    "fedncf": ("user_mf", "user_mlp"),
}


@dataclass
class DenseState:
    """globals: name -> full tensor.  personal: user id -> name -> tensor (item tables [I, d])."""

    globals: dict[str, torch.Tensor]
    personal: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)


@dataclass
class ClientLog:
    """What one client's local training did: rows processed (summed over the epochs run),
    epochs run, and the epoch losses L_0, L_1, ... (mean of the batch losses before each update)."""

    rows: int
    epochs: int
    epoch_losses: list[float]


def initial_dense_state(config: ExperimentConfig, n_users: int, n_items: int) -> DenseState:
    """The engine's seeded initial model (spec §0.3), expanded to dense per-user parameters."""
    init = initial_state(config, n_users, n_items)
    personal: dict[int, dict[str, torch.Tensor]] = {}
    for u in range(n_users):
        mine = {name: value.clone() for name, value in init.personal_shared.items()}
        mine.update({name: table[u].clone() for name, table in init.personal_per_user.items()})
        mine.update({name: base.clone() for name, base in init.personal_table_base.items()})
        personal[u] = mine
    return DenseState(globals={k: v.clone() for k, v in init.global_params.items()}, personal=personal)


# --- one client's model: plain nn.Module with dense parameters ------------------------------------


class LinearHeadModel(nn.Module):
    """FedAvg / FCF / PFedRec: logit = w . item[i] + b (item is Q, or Q~_u for PFedRec)."""

    def __init__(self, item: torch.Tensor, w: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.item = nn.Parameter(item.clone())
        self.w = nn.Parameter(w.clone())
        self.b = nn.Parameter(b.clone())

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        return self.item[items] @ self.w + self.b


class FedRAPModel(nn.Module):
    """logit = w . (P[i] + C[i]) + b."""

    def __init__(self, item_personal, item_global, w, b):
        super().__init__()
        self.item_personal = nn.Parameter(item_personal.clone())
        self.item_global = nn.Parameter(item_global.clone())
        self.w = nn.Parameter(w.clone())
        self.b = nn.Parameter(b.clone())

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        return (self.item_personal[items] + self.item_global[items]) @ self.w + self.b


class NCFModel(nn.Module):
    """head([ReLU-tower([m_mlp; q_mlp]); m_mf * q_mf]) with ReLU after each of 3 tower layers."""

    def __init__(self, params: dict[str, torch.Tensor], dim: int):
        super().__init__()
        self.item_mf = nn.Parameter(params["item_mf"].clone())
        self.item_mlp = nn.Parameter(params["item_mlp"].clone())
        self.user_mf = nn.Parameter(params["user_mf"].clone())
        self.user_mlp = nn.Parameter(params["user_mlp"].clone())
        widths = [2 * dim, dim, dim // 2, dim // 4]
        dtype = params["item_mf"].dtype
        self.tower = nn.ModuleList([skip_init(nn.Linear, a, b, dtype=dtype) for a, b in zip(widths[:-1], widths[1:])])
        self.head = skip_init(nn.Linear, dim // 4 + dim, 1, dtype=dtype)
        with torch.no_grad():
            for k, layer in enumerate(self.tower):
                layer.weight.copy_(params[f"tower.{k}.weight"])
                layer.bias.copy_(params[f"tower.{k}.bias"])
            self.head.weight.copy_(params["head.weight"])
            self.head.bias.copy_(params["head.bias"])

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        n = len(items)
        x = torch.cat([self.user_mlp.expand(n, -1), self.item_mlp[items]], dim=1)
        for layer in self.tower:
            x = torch.relu(layer(x))
        gmf = self.user_mf.expand(n, -1) * self.item_mf[items]
        return self.head(torch.cat([x, gmf], dim=1))[:, 0]


def _build_model(backbone: str, params: dict[str, torch.Tensor], dim: int) -> nn.Module:
    if backbone in ("fedavg", "fcf", "pfedrec"):
        return LinearHeadModel(params["item"], params["w"], params["b"])
    if backbone == "fedrap":
        return FedRAPModel(params["item_personal"], params["item_global"], params["w"], params["b"])
    if backbone == "fedncf":
        return NCFModel(params, dim)
    raise ValueError(backbone)


def _model_params(backbone: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters under the DenseState names (detached copies)."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# --- learning rates (spec §1-§5: item lr rules; §5 lr decay) -------------------------------------


def _lr(config: ExperimentConfig, round_: int) -> float:
    base = config.train.lr if config.train.lr is not None else {
        "fedavg": 0.01, "fcf": 0.1, "fedncf": 0.1, "pfedrec": 0.1, "fedrap": 0.1}[config.model.backbone]
    decay = config.train.lr_decay if config.train.lr_decay is not None else (
        0.9 if config.model.backbone == "fedrap" else 1.0)
    return base * decay ** round_


def _item_lr(config: ExperimentConfig, round_: int, n_items: int) -> float:
    lr = _lr(config, round_)
    backbone = config.model.backbone
    if backbone in ("fcf", "fedrap"):
        return lr * n_items
    if backbone == "pfedrec":
        return lr * n_items * config.model.pfedrec_eta
    return lr  # fedavg, fedncf


def _param_groups(backbone: str, model: nn.Module, lr: float, item_lr: float) -> list[dict]:
    item_names = {"item", "item_global", "item_personal", "item_mf", "item_mlp"}
    if backbone == "fedncf":  # one lr for everything (item lr == lr anyway)
        return [{"params": list(model.parameters()), "lr": lr}]
    items = [p for n, p in model.named_parameters() if n in item_names]
    rest = [p for n, p in model.named_parameters() if n not in item_names]
    return [{"params": rest, "lr": lr}, {"params": items, "lr": item_lr}]


# --- local training of one client ------------------------------------------------------------------


def _loss(config: ExperimentConfig, model: nn.Module, items: torch.Tensor, labels: torch.Tensor,
          round_: int) -> torch.Tensor:
    """Mean BCE on logits + backbone extras (FedRAP: -lambda_t MSE(P_B, C_B) + mu_t R(C_B))."""
    loss = F.binary_cross_entropy_with_logits(model(items), labels)  # reduction='mean'
    if config.model.backbone == "fedrap":
        lam = math.tanh(round_ / 10.0) * config.model.fedrap_lambda
        mu = math.tanh(round_ / 10.0) * config.model.fedrap_mu
        p_b, c_b = model.item_personal[items], model.item_global[items]
        reg = c_b.abs().mean() if config.model.fedrap_reg == "l1" else (c_b ** 2).mean()
        loss = loss - lam * F.mse_loss(p_b, c_b) + mu * reg
    return loss


def train_client(config: ExperimentConfig, data: PreparedDataset, user: int, params: dict[str, torch.Tensor],
                 round_: int) -> tuple[dict[str, torch.Tensor], ClientLog]:
    """Local training of one client from `params` (its download + its personal state, dense).
    Returns the trained parameters (same names) and a log."""
    backbone, train = config.model.backbone, config.train
    lr, item_lr = _lr(config, round_), _item_lr(config, round_, data.n_items)
    model = _build_model(backbone, params, config.model.dim)
    two_step = backbone == "pfedrec" and config.model.pfedrec_update == "two_step"
    if two_step:
        head_opt = torch.optim.SGD([model.w, model.b], lr=lr, momentum=0.0, weight_decay=train.weight_decay)
        item_opt = torch.optim.SGD([model.item], lr=item_lr, momentum=0.0, weight_decay=train.weight_decay)
    else:
        opt = torch.optim.SGD(_param_groups(backbone, model, lr, item_lr), lr=lr, momentum=0.0,
                              weight_decay=train.weight_decay)
    dtype = next(model.parameters()).dtype

    cd = client_data(data, np.array([user]), neg_pool=train.neg_pool, neg_exclude_heldout=train.neg_exclude_heldout)
    rows_processed, epoch_losses = 0, []
    for epoch in range(train.local_epochs):
        rows = epoch_rows(cd, neg_ratio=train.neg_ratio, rows_per_batch=train.rows_per_batch(), seed=train.seed,
                          round_=round_, epoch=epoch)
        batch_losses = []
        for batch in range(int(rows.batch.max()) + 1 if len(rows.batch) else 0):
            mask = rows.batch == batch
            items = torch.as_tensor(rows.item[mask], dtype=torch.int64)
            labels = torch.as_tensor(rows.label[mask], dtype=dtype)
            if two_step:
                # (a) head only, item copy frozen
                model.item.requires_grad_(False)
                head_opt.zero_grad()
                loss = _loss(config, model, items, labels, round_)
                batch_losses.append(loss.item())
                loss.backward()
                head_opt.step()
                model.item.requires_grad_(True)
                # (b) loss recomputed with the updated head; item copy only
                model.w.requires_grad_(False)
                model.b.requires_grad_(False)
                item_opt.zero_grad()
                _loss(config, model, items, labels, round_).backward()
                item_opt.step()
                model.w.requires_grad_(True)
                model.b.requires_grad_(True)
            else:
                opt.zero_grad()
                loss = _loss(config, model, items, labels, round_)
                batch_losses.append(loss.item())
                loss.backward()
                opt.step()
            rows_processed += int(mask.sum())
        epoch_losses.append(float(np.mean(batch_losses)))
        if epoch >= 1:
            now, before = epoch_losses[-1], epoch_losses[-2]
            if abs(now - before) / (abs(now) + 1e-6) < train.tol:
                break
    return _model_params(backbone, model), ClientLog(rows_processed, len(epoch_losses), epoch_losses)


# --- one round ---------------------------------------------------------------------------------------


def oracle_round(config: ExperimentConfig, data: PreparedDataset, state: DenseState, round_: int,
                 dtype=torch.float64, logs: dict[int, ClientLog] | None = None) -> DenseState:
    """One federated round, clients trained one after the other. Returns a new DenseState
    (the input is not modified). `logs`, if given, receives each participant's ClientLog."""
    backbone = config.model.backbone
    global_names = GLOBAL_NAMES[backbone]
    downloaded = {name: value.to(dtype) for name, value in state.globals.items()}
    users = participants(data.n_users, config.train.participation, config.train.seed, round_)
    new_personal = dict(state.personal)
    uploads, weights = [], []
    for user in users.tolist():
        params = copy.deepcopy(downloaded)
        personal = {name: value.to(dtype).clone() for name, value in state.personal[user].items()}
        if backbone == "pfedrec":
            personal.pop("item", None)  # Q~_u <- downloaded Q at the start of every round
        params.update(personal)
        trained, log = train_client(config, data, user, params, round_)
        if logs is not None:
            logs[user] = log
        uploads.append({name: trained[name] for name in global_names})
        weights.append(float(log.rows) if backbone == "fedavg" else 1.0)
        mine = {name: trained[name] for name in PERSONAL_NAMES[backbone]}
        if backbone == "pfedrec":
            mine["item"] = trained["item"]  # the fine-tuned copy, the user's evaluation table
        new_personal[user] = mine
    if not uploads:
        return DenseState(globals=downloaded, personal=new_personal)
    total = sum(weights)
    new_globals = dict(downloaded)
    for name in global_names:
        new_globals[name] = sum(w / total * up[name] for w, up in zip(weights, uploads))
    return DenseState(globals=new_globals, personal=new_personal)


def oracle_scores(config: ExperimentConfig, state: DenseState, users: list[int], n_items: int) -> torch.Tensor:
    """[B, n_items] logits of `users` with the current globals and each user's personal state."""
    backbone = config.model.backbone
    all_items = torch.arange(n_items)
    out = []
    with torch.no_grad():
        for user in users:
            params = dict(state.globals)
            personal = dict(state.personal[int(user)])
            if backbone == "pfedrec" and (config.model.pfedrec_eval_table == "global" or "item" not in personal):
                personal.pop("item", None)  # never trained, or evaluation on the current Q
            dtype = params[GLOBAL_NAMES[backbone][0]].dtype
            params.update({k: v.to(dtype) for k, v in personal.items()})
            out.append(_build_model(backbone, params, config.model.dim)(all_items))
    return torch.stack(out)
