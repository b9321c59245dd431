"""Textbook one-client-at-a-time federated trainer: the test oracle of the vectorised engine.

Written from the methods' equations alone (docs/methods.md), deliberately naive: every client holds dense full
tensors (personal item tables as [I, d]), trains with `torch.optim.SGD` and autograd, one
mini-batch at a time, and the server averages full tensors. Nothing here imports the math
of pipeline/models/*.py or pipeline/federated/engine/client.py; the only shared pieces are the
seeded initial model, the participant stream and the row sampler (shared randomness, not
math), so both sides see the same clients, rows and starting point.

FedMR (`model.fusion` set) is written here again from its equations, as one
nn.Module per client (`FedMRClient`, nn.Linear / nn.LayerNorm, row by row, no dedup), with
the server's grad_adam step as torch.optim.Adam. Shared with the engine besides the above:
the dropout mask function (sampling.dropout_keep: masks keyed by user and item, so the same
item in the same mini-batch gets the same mask) and the parameter names.

GFMFR (`model.gfmfr` set): the clients' distillation term and its rho (OracleKD),
the grouping vectors, group targets, group heads and teacher scores are written here again;
the server's clustering (grouping.group_users) and group fusion model (GroupFusion,
train_group_fusion) are shared with the engine: they run on the server alone, and their own
tests pin them.

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

from pipeline.config import ExperimentConfig, lr_value
from pipeline.data.prepare import PreparedDataset
from pipeline.federated.strategy.aggregate import initial_state, round_users
from pipeline.federated.strategy.group_server import new_group_fusion
from pipeline.federated.strategy.grouping import cluster_seed, group_users
from pipeline.federated.privacy import gaussian_noise
from pipeline.federated.engine.sampling import client_data, dropout_keep, epoch_rows
from pipeline.models.group_fusion import train_group_fusion

# --- what each backbone downloads/uploads and keeps ----------------------

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
    server: dict = field(default_factory=dict)  # FedMR grad_adam: the server's Adam (params, optimiser)


@dataclass
class ClientLog:
    """What one client's local training did: rows processed (summed over the epochs run),
    epochs run, and the epoch losses L_0, L_1, ... (mean of the batch losses before each update)."""

    rows: int
    epochs: int
    epoch_losses: list[float]


def initial_dense_state(config: ExperimentConfig, n_users: int, n_items: int,
                        feature_dims: dict[str, int] | None = None) -> DenseState:
    """The engine's seeded initial model, expanded to dense per-user parameters."""
    if config.model.fusion is not None:
        return _fedmr_initial_state(config, n_users, n_items, feature_dims)
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


# --- learning rates (each backbone's item lr rule; lr decay) -------------------------------------------


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


def _lr_group(name: str) -> str:
    """The train.lr_groups group of a parameter name."""
    if name.startswith("fedmr."):
        return "fusion"
    if name in ("w", "b"):
        return "head"
    if name in ("item_personal", "item_global"):
        return name
    if name in ("item", "item_mf", "item_mlp", "fedmr_item"):
        return "item"
    if name in ("user_mf", "user_mlp"):
        return "user"
    return "network"  # FedNCF's tower and head


def _group_lr(config: ExperimentConfig, round_: int, n_items: int, name: str, default: float) -> float:
    """`default`, or the parameter's group lr from train.lr_groups (a number or 'K*n') decayed
    to round t."""
    value = config.train.lr_groups.get(_lr_group(name))
    if value is None:
        return default
    decay = config.train.lr_decay if config.train.lr_decay is not None else (
        0.9 if config.model.backbone == "fedrap" else 1.0)
    return lr_value(value, n_items) * decay ** round_


def _param_groups(config: ExperimentConfig, model: nn.Module, lr: float, item_lr: float, round_: int,
                  n_items: int, names: set[str] | None = None) -> list[dict]:
    """One SGD parameter group per parameter (those in `names`, default all) with its lr."""
    item_names = {"item", "item_global", "item_personal", "item_mf", "item_mlp"}
    if config.model.backbone == "fedncf":
        item_lr = lr  # one lr for everything
    return [{"params": [p], "lr": _group_lr(config, round_, n_items, n, item_lr if n in item_names else lr)}
            for n, p in model.named_parameters() if names is None or n in names]


def _optimizer(config: ExperimentConfig, groups: list[dict]):
    """(SGD over `groups`, a scheduler stepped after every mini-batch: lr x lr_batch_decay^k)."""
    opt = torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.0, weight_decay=config.train.weight_decay)
    return opt, torch.optim.lr_scheduler.ExponentialLR(opt, gamma=config.train.lr_batch_decay)


# --- local training of one client ------------------------------------------------------------------


def _loss(config: ExperimentConfig, model: nn.Module, items: torch.Tensor, labels: torch.Tensor,
          round_: int, kd: "OracleKD | None" = None, update: bool = True) -> torch.Tensor:
    """Mean BCE on logits + backbone extras (FedRAP: -lambda_t MSE(P_B, C_B) + mu_t R(C_B))
    + GFMFR's kappa * KL(teacher || student) when the client distils."""
    logits = model(items)
    bce = F.binary_cross_entropy_with_logits(logits, labels)  # reduction='mean'
    loss = bce + _fedrap_terms(config, model, items, round_)
    if kd is not None:
        loss = loss + kd.term(logits, items, bce, update)
    return loss


@dataclass
class OracleKD:
    """One client's GFMFR distillation, written from its equations: its group's
    teacher scores [N], its loss-ratio EMA rho (NaN: unset) and a(t)."""

    teacher: torch.Tensor
    rho: float
    weight: float
    rho_max: float | None = None

    def term(self, logits: torch.Tensor, items: torch.Tensor, bce: torch.Tensor, update: bool) -> torch.Tensor:
        q1 = self.teacher[items].clamp(1e-7, 1.0)
        q0 = (1 - self.teacher[items]).clamp(1e-7, 1.0)
        p1 = torch.sigmoid(logits).clamp(1e-7, 1.0)
        p0 = (1 - torch.sigmoid(logits)).clamp(1e-7, 1.0)
        kd = (q1 * (q1.log() - p1.log()) + q0 * (q0.log() - p0.log())).mean()
        if update and kd.item() > 1e-8:  # before the backward pass, from detached scalars
            ratio = bce.item() / (kd.item() + 1e-8)
            self.rho = ratio if math.isnan(self.rho) else 0.9 * self.rho + 0.1 * ratio
            self.rho = max(self.rho, 0.0) if self.rho_max is None else min(max(self.rho, 0.0), self.rho_max)
        kappa = 0.0 if math.isnan(self.rho) else self.rho * self.weight
        return kappa * kd


def _fedrap_terms(config: ExperimentConfig, model: nn.Module, items: torch.Tensor, round_: int):
    """-lambda_t MSE(P_B, C_B) + mu_t R(C_B) for FedRAP (0 for other backbones)."""
    if config.model.backbone != "fedrap":
        return 0.0
    ramp = 1.0 if config.model.fedrap_schedule == "constant" else math.tanh(round_ / 10.0)
    lam = ramp * config.model.fedrap_lambda
    mu = ramp * config.model.fedrap_mu
    p_b, c_b = model.item_personal[items], model.item_global[items]
    reg = c_b.abs().mean() if config.model.fedrap_reg == "l1" else (c_b ** 2).mean()
    return -lam * F.mse_loss(p_b, c_b) + mu * reg


def _local_epochs(config: ExperimentConfig, data: PreparedDataset, user: int, round_: int, dtype,
                  train_step, device="cpu") -> ClientLog:
    """The textbook local loop of one client: fresh rows every epoch (the shared sampler),
    mini-batches in order, early stop on the relative change of the mean batch loss.
    train_step(epoch, batch, items, labels) runs one mini-batch and returns its loss before
    the update."""
    train = config.train
    cd = client_data(data, np.array([user]), neg_pool=train.neg_pool, neg_exclude_heldout=train.neg_exclude_heldout)
    rows_processed, epoch_losses = 0, []
    for epoch in range(train.local_epochs):
        rows = epoch_rows(cd, neg_ratio=train.neg_ratio, rows_per_batch=train.rows_per_batch(), seed=train.seed,
                          round_=round_, epoch=epoch, neg_draw=train.neg_draw)
        batch_losses = []
        for batch in range(int(rows.batch.max()) + 1 if len(rows.batch) else 0):
            mask = rows.batch == batch
            items = torch.as_tensor(rows.item[mask], dtype=torch.int64).to(device)
            labels = torch.as_tensor(rows.label[mask]).to(device=device, dtype=dtype)
            batch_losses.append(train_step(epoch, batch, items, labels))
            rows_processed += int(mask.sum())
        epoch_losses.append(float(np.mean(batch_losses)))
        if epoch >= 1 and abs(epoch_losses[-1] - epoch_losses[-2]) / (abs(epoch_losses[-1]) + 1e-6) < train.tol:
            break
    return ClientLog(rows_processed, len(epoch_losses), epoch_losses)


def train_client(config: ExperimentConfig, data: PreparedDataset, user: int, params: dict[str, torch.Tensor],
                 round_: int, kd: OracleKD | None = None) -> tuple[dict[str, torch.Tensor], ClientLog]:
    """Local training of one client from `params` (its download + its personal state, dense);
    kd: its GFMFR distillation (rho updated in place). Returns the trained parameters (same
    names) and a log."""
    backbone = config.model.backbone
    lr, item_lr = _lr(config, round_), _item_lr(config, round_, data.n_items)
    model = _build_model(backbone, params, config.model.dim)
    two_step = backbone == "pfedrec" and config.model.pfedrec_update == "two_step"
    n = data.n_items
    if two_step:
        head_opt, head_sched = _optimizer(config, _param_groups(config, model, lr, item_lr, round_, n, {"w", "b"}))
        item_opt, item_sched = _optimizer(config, _param_groups(config, model, lr, item_lr, round_, n, {"item"}))
    else:
        opt, sched = _optimizer(config, _param_groups(config, model, lr, item_lr, round_, n))
    dtype = next(model.parameters()).dtype

    def train_step(epoch, batch, items, labels) -> float:
        if two_step:
            # (a) head only, item copy frozen
            model.item.requires_grad_(False)
            head_opt.zero_grad()
            loss = _loss(config, model, items, labels, round_, kd)
            loss.backward()
            head_opt.step()
            model.item.requires_grad_(True)
            # (b) loss recomputed with the updated head; item copy only
            model.w.requires_grad_(False)
            model.b.requires_grad_(False)
            item_opt.zero_grad()
            _loss(config, model, items, labels, round_, kd, update=False).backward()
            item_opt.step()
            model.w.requires_grad_(True)
            model.b.requires_grad_(True)
            head_sched.step()
            item_sched.step()
        else:
            opt.zero_grad()
            loss = _loss(config, model, items, labels, round_, kd)
            loss.backward()
            opt.step()
            sched.step()
        return loss.item()

    log = _local_epochs(config, data, user, round_, dtype, train_step, device=next(model.parameters()).device)
    return _model_params(backbone, model), log


# --- one round ---------------------------------------------------------------------------------------


def oracle_round(config: ExperimentConfig, data: PreparedDataset, state: DenseState, round_: int,
                 dtype=torch.float64, logs: dict[int, ClientLog] | None = None, device="cpu") -> DenseState:
    """One federated round, clients trained one after the other. Returns a new DenseState
    (the input is not modified). `logs`, if given, receives each participant's ClientLog.
    device: where the clients train (the trained parameters stay there)."""
    if config.model.fusion is not None:
        if torch.device(device).type != "cpu":
            raise ValueError("the FedMR oracle runs on the CPU only")
        return oracle_round_fedmr(config, data, state, round_, dtype, logs)
    backbone = config.model.backbone
    global_names = GLOBAL_NAMES[backbone]
    downloaded = {name: value.to(device=device, dtype=dtype) for name, value in state.globals.items()}
    users = round_users(config, data.train_counts, round_).arrived
    new_personal = dict(state.personal)
    uploads, weights = [], []
    gfmfr = config.model.gfmfr
    server = dict(state.server)
    rhos = _start_rhos(config, server, data.n_users) if gfmfr is not None else {}
    finals = []
    trained_by_user = {}
    for user in users.tolist():
        params = copy.deepcopy(downloaded)
        personal = {name: value.to(device=device, dtype=dtype).clone()
                    for name, value in state.personal[user].items()}
        if backbone == "pfedrec":
            personal.pop("item", None)  # Q~_u <- downloaded Q at the start of every round
        params.update(personal)
        kd = _oracle_kd(config, server, rhos, user, round_) if gfmfr is not None else None
        trained, log = train_client(config, data, user, params, round_, kd)
        if kd is not None:
            rhos[user] = kd.rho
            if not math.isnan(kd.rho):
                finals.append(kd.rho)
        trained_by_user[user] = trained
        if logs is not None:
            logs[user] = log
        uploads.append({name: trained[name] for name in global_names})
        weights.append(float(log.rows) if backbone == "fedavg" else 1.0)
        mine = {name: trained[name] for name in PERSONAL_NAMES[backbone]}
        if backbone == "pfedrec":
            mine["item"] = trained["item"]  # the fine-tuned copy, the user's evaluation table
        new_personal[user] = mine
    if not uploads:
        return DenseState(globals=downloaded, personal=new_personal, server=server)
    total = sum(weights)
    new_globals = dict(downloaded)
    if config.privacy is not None:
        mean = _private_mean(config, downloaded, uploads, [{} for _ in uploads], round_)
        new_globals = {name: downloaded[name] + mean[name] for name in downloaded}
    else:
        for name in global_names:
            new_globals[name] = sum(w / total * up[name] for w, up in zip(weights, uploads))
    if gfmfr is not None:
        _end_rhos(config, server, rhos, finals)
        _oracle_group_step(config, data, server, round_, users.tolist(), trained_by_user, dtype)
    return DenseState(globals=new_globals, personal=new_personal, server=server)


# === GFMFR's server step, ID backbones ================================
# Shared with the engine: the clustering (grouping.group_users) and the group fusion model
# (GroupFusion, train_group_fusion, initialised by group_server.new_group_fusion); written
# again here: grouping vectors, group targets (dense means), group heads, the teacher.

GROUP_TABLES = {"fedavg": "item", "fcf": "item", "pfedrec": "item", "fedrap": "item_global", "fedncf": "item_mlp"}
GROUP_VECTORS = {"fedncf": ("tower.0.weight", "tower.0.bias", "tower.1.weight", "tower.1.bias",
                            "tower.2.weight", "tower.2.bias", "head.weight", "head.bias")}


def run_oracle(config: ExperimentConfig, data: PreparedDataset, rounds: int, logs: list | None = None, *,
               dtype=torch.float64, state: DenseState | None = None, start: int = 0, device="cpu") -> DenseState:
    """Oracle rounds start .. start + rounds - 1 from the seeded initial state (or `state`, the state
    after round start - 1); logs: each round's {user: ClientLog} appended. device: where the
    clients train (ID backbones)."""
    from pipeline.federated.strategy.aggregate import feature_dims

    if state is None:
        state = initial_dense_state(config, data.n_users, data.n_items, feature_dims(data))
    for round_ in range(start, start + rounds):
        round_logs = {}
        state = oracle_round(config, data, state, round_, dtype=dtype, logs=round_logs, device=device)
        if logs is not None:
            logs.append(round_logs)
    return state


def _teacher_weight(config: ExperimentConfig, round_: int) -> float:
    """a(t): the distillation weight's schedule."""
    t, rounds = round_, config.train.rounds
    return {"cosine": math.cos(math.pi * t / (2 * rounds)), "constant": 1.0, "linear_increase": t / rounds,
            "exponential_increase": 1 - math.exp(-t / 10)}[config.model.gfmfr.kd_schedule]


def _oracle_kd(config: ExperimentConfig, server: dict, rhos: dict, user: int, round_: int) -> OracleKD | None:
    """The client's distillation this round: None without a (non-empty) group."""
    teacher = server.get("teacher")
    if teacher is None or teacher[1].get(user, -1) < 0 or bool(torch.isnan(teacher[0][teacher[1][user]]).any()):
        return None
    return OracleKD(teacher[0][teacher[1][user]], rhos.get(user, math.nan), _teacher_weight(config, round_),
                    config.model.gfmfr.rho_max)


def _start_rhos(config: ExperimentConfig, server: dict, n_users: int) -> dict:
    if config.model.gfmfr.ema_scope == "shared_round":  # every client starts from the shared value
        return {user: server.get("shared_rho", math.nan) for user in range(n_users)}
    return dict(server.get("rho", {}))


def _end_rhos(config: ExperimentConfig, server: dict, rhos: dict, finals: list[float]) -> None:
    server["rho"] = rhos
    if config.model.gfmfr.ema_scope == "shared_round" and finals:
        server["shared_rho"] = sum(finals) / len(finals)


def _oracle_group_step(config: ExperimentConfig, data: PreparedDataset, server: dict, round_: int,
                       users: list[int], trained: dict[int, dict[str, torch.Tensor]], dtype,
                       table: str | None = None, fuse=None) -> None:
    """fuse(z [N, d_id], members' trained params) -> [N, d]: FedMR's teacher input."""
    gfmfr, backbone = config.model.gfmfr, config.model.backbone
    n_groups = gfmfr.group_num
    names = GROUP_VECTORS.get(backbone, ("w", "b"))
    vectors = torch.stack([torch.cat([trained[u][n].reshape(-1) for n in names]) for u in users])
    known = server.setdefault("known", {})
    previous = np.full(data.n_users, -1)
    for user, group in known.items():
        previous[user] = group
    if gfmfr.group_method == "planted" and "planted" not in server:
        from pipeline.data.datasets import planted_groups

        server["planted"] = planted_groups(config.data)
    ids = group_users(vectors.numpy(), np.asarray(users), n_groups, method=gfmfr.group_method,
                      use_pca=gfmfr.use_pca, seed=config.train.seed, round_=round_, previous=previous,
                      planted=server.get("planted")).tolist()
    table = table or GROUP_TABLES[backbone]
    features = {m: torch.as_tensor(np.asarray(x)).to(dtype) for m, x in data.features.items() if m in ("text", "image")}
    if "fusion" not in server:
        width = trained[users[0]][table].shape[1]
        server["fusion"] = new_group_fusion(config, width, {m: x.shape[1] for m, x in features.items()}, dtype)
    members = torch.tensor([ids.count(g) for g in range(n_groups)])
    targets = torch.stack([
        torch.stack([trained[u][table] for u, g in zip(users, ids) if g == group]).mean(0) if members[group]
        else torch.zeros_like(trained[users[0]][table]) for group in range(n_groups)])
    fusion = server["fusion"]
    scale = 1.0  # server_target_scale rms: fit the targets over their root mean square, scale the tables back
    if gfmfr.server_target_scale == "rms":
        rms = math.sqrt(float(torch.cat([targets[g].double().reshape(-1) for g in range(n_groups)
                                         if members[g]]).square().mean()))
        scale = rms if rms > 0 else 1.0
    train_group_fusion(fusion, targets / scale, members, features, epochs=gfmfr.server_epochs, lr=gfmfr.server_lr,
                       weight_decay=gfmfr.server_weight_decay, batch=gfmfr.server_batch,
                       seed=cluster_seed(config.train.seed, round_))
    scores = torch.full((n_groups, data.n_items), math.nan, dtype=dtype)
    all_items = torch.arange(data.n_items)
    with torch.no_grad():
        for group in range(n_groups):
            if not members[group]:
                continue
            z = fusion.table(group, features, data.n_items) * scale
            mine = [trained[u] for u, g in zip(users, ids) if g == group]
            if fuse is not None:
                z = fuse(z, mine)
            head = {n: torch.stack([t[n] for t in mine]).mean(0) for n in names}
            if backbone == "fedncf":  # both user vectors 0: the GMF part vanishes
                dim = z.shape[1]
                params = {**head, "item_mlp": z, "item_mf": torch.zeros_like(z),
                          "user_mlp": torch.zeros(dim, dtype=dtype), "user_mf": torch.zeros(dim, dtype=dtype)}
                scores[group] = torch.sigmoid(NCFModel(params, dim)(all_items))
            else:
                scores[group] = torch.sigmoid(z @ head["w"] + head["b"])
    for user, group in zip(users, ids):
        known[user] = group
    of = dict(known) if gfmfr.group_membership == "last_known" else dict(zip(users, ids))
    server["teacher"] = (scores, of)


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


# === FedMR ===========================================================================
# What is local: the backbone's personal parts, the personal head on z_i, and the
# router when router_scope=local. Everything else of the module is global, as is FedNCF's table E.


def _fedmr_is_personal(config: ExperimentConfig, name: str) -> bool:
    backbone, fusion = config.model.backbone, config.model.fusion
    if name in PERSONAL_NAMES[backbone]:
        return True
    return name.startswith("fedmr.router.") and fusion.router_scope == "local"


def _fedmr_initial_state(config, n_users, n_items, feature_dims) -> DenseState:
    """The shared seeded initial model, split by the oracle's own reading of the methods."""
    init = initial_state(config, n_users, n_items, feature_dims)
    everything = {**init.global_params, **init.personal_shared, **init.personal_table_base}
    globals_ = {k: v.clone() for k, v in everything.items() if not _fedmr_is_personal(config, k)}
    personal = {}
    for u in range(n_users):
        mine = {k: v.clone() for k, v in everything.items() if _fedmr_is_personal(config, k)}
        mine.update({name: table[u].clone() for name, table in init.personal_per_user.items()})
        personal[u] = mine
    return DenseState(globals=globals_, personal=personal)


def _linear(fan_in: int, fan_out: int, dtype) -> nn.Linear:
    return skip_init(nn.Linear, fan_in, fan_out, dtype=dtype)


class _Part(nn.Module):
    pass


class OracleFusion(nn.Module):
    """The Mixing Feature Fusion Module of one client, nn.Modules only."""

    def __init__(self, fcfg, d_id: int, dims: dict[str, int], dtype):
        super().__init__()
        self.cfg = fcfg
        d_f = fcfg.d_f
        mods = list(fcfg.modalities)
        self.mods = mods
        width = {"id": d_id, **dims}

        def norm():
            return nn.LayerNorm(d_f, eps=1e-5, dtype=dtype) if fcfg.layer_norm else nn.Identity()

        self.proj = nn.ModuleDict({m: _linear(width[m], d_f, dtype) for m in mods})
        self.ln = nn.ModuleDict({m: norm() for m in mods})
        kinds = ["sum", "mlp", "gate"] if fcfg.fusion == "moe" else [fcfg.fusion]
        if "mlp" in kinds:
            self.mlp = _Part()
            self.mlp.fc1 = _linear(len(mods) * d_f, 2 * d_f, dtype)
            self.mlp.fc2 = _linear(2 * d_f, d_f, dtype)
            self.mlp.ln = norm()
        if "gate" in kinds:
            self.gate = _Part()
            self.gate.g = nn.ModuleDict({m: _linear(d_f, d_f, dtype) for m in mods})
            self.gate.out = _linear(len(mods) * d_f, d_f, dtype)
            self.gate.ln = norm()
        if "attention" in kinds:
            self.attn = _Part()
            if fcfg.attention_variant == "modality_tokens":
                for part in "qkvo":
                    setattr(self.attn, part, _linear(d_f, d_f, dtype))
            else:
                wide = len(mods) * d_f
                self.attn.pre = _linear(wide, wide, dtype)
                self.attn.v = _linear(wide, wide, dtype)
                self.attn.o = _linear(wide, wide, dtype)
            self.attn.out = _linear(len(mods) * d_f, d_f, dtype)
            self.attn.ln = norm()
        if fcfg.fusion == "moe":
            self.router = _Part()
            self.router.fc1 = _linear(3 * d_f, fcfg.d_r, dtype)
            self.router.fc2 = _linear(fcfg.d_r, 3, dtype)
        self.drop_key = None  # (seed, round, epoch, step, user) while training, None in eval mode

    def _drop(self, x: torch.Tensor, items: torch.Tensor, site: int) -> torch.Tensor:
        p = self.cfg.dropout
        if self.drop_key is None or p == 0:
            return x
        seed, round_, epoch, step, user = self.drop_key
        flat = x.reshape(len(x), -1)
        keep = dropout_keep(seed, round_, epoch, step, site, np.full(len(items), user), items.numpy(),
                            flat.shape[1], p)
        return (flat * torch.as_tensor(keep, dtype=x.dtype) / (1 - p)).reshape(x.shape)

    def experts(self, e: torch.Tensor | None, feats: dict[str, torch.Tensor], items: torch.Tensor) -> dict:
        """The expert outputs for the rows `items` ({name: [N, d_f]})."""
        inputs = {"id": e, **feats}
        h = [self.ln[m](self.proj[m](inputs[m])) for m in self.mods]
        out = {}
        if hasattr(self, "router") or self.cfg.fusion == "sum":
            total = h[0]
            for x in h[1:]:
                total = total + x
            out["sum"] = total
        if hasattr(self, "mlp"):
            hidden = self._drop(torch.relu(self.mlp.fc1(torch.cat(h, dim=1))), items, 1)
            out["mlp"] = self.mlp.ln(self.mlp.fc2(hidden))
        if hasattr(self, "gate"):
            site = {"id": 2, "text": 3, "image": 4}
            gates = [torch.sigmoid(self._drop(self.gate.g[m](x), items, site[m])) for m, x in zip(self.mods, h)]
            out["gate"] = self.gate.ln(self.gate.out(torch.cat(gates, dim=1)))
        if hasattr(self, "attn"):
            out["attention"] = self._attention(h, items)
        return out

    def _attention(self, h: list[torch.Tensor], items: torch.Tensor) -> torch.Tensor:
        n, heads, d_f = len(items), self.cfg.attention_heads, self.cfg.d_f
        if self.cfg.attention_variant == "modality_tokens":
            tokens = torch.stack(h, dim=1)  # [N, M, d_f]
            m, dh = tokens.shape[1], d_f // heads
            q = self.attn.q(tokens).reshape(n, m, heads, dh).permute(0, 2, 1, 3)
            k = self.attn.k(tokens).reshape(n, m, heads, dh).permute(0, 2, 1, 3)
            v = self.attn.v(tokens).reshape(n, m, heads, dh).permute(0, 2, 1, 3)
            att = torch.softmax(torch.matmul(q, k.transpose(2, 3)) / dh ** 0.5, dim=-1)
            att = self._drop(att, items, 6)
            mixed = torch.matmul(att, v).permute(0, 2, 1, 3).reshape(n, m, d_f)
            flat = self.attn.o(mixed).reshape(n, m * d_f)
        else:
            x = self.attn.pre(torch.cat(h, dim=1))
            v = self.attn.v(x)  # one key: the attention weight is exactly 1 (dropped per head)
            weight = self._drop(torch.ones(n, heads, dtype=x.dtype), items, 6)
            v = (v.reshape(n, heads, -1) * weight.unsqueeze(2)).reshape(n, -1)
            flat = self.attn.o(v)
        return self.attn.ln(self.attn.out(flat))

    def route(self, ex: dict, items: torch.Tensor) -> torch.Tensor:
        c = torch.cat([ex["sum"], ex["mlp"], ex["gate"]], dim=1)
        hidden = self._drop(torch.relu(self.router.fc1(c)), items, 5)
        return torch.softmax(self.router.fc2(hidden), dim=1)


class FedMRClient(nn.Module):
    """One client's whole model: backbone tables and personal parts, FedMR module, head."""

    def __init__(self, config: ExperimentConfig, params: dict[str, torch.Tensor], dims: dict[str, int]):
        super().__init__()
        self.backbone = config.model.backbone
        self.fcfg = config.model.fusion
        dtype = next(iter(params.values())).dtype
        tables = {"fedavg": ["item"], "fcf": ["item"], "pfedrec": ["item"],
                  "fedrap": ["item_personal", "item_global"],
                  "fedncf": ["item_mf", "item_mlp", "user_mf", "user_mlp"]}[self.backbone]
        if self.backbone == "fedncf" and "fedmr_item" in params:
            tables.append("fedmr_item")
        for name in tables:
            setattr(self, name, nn.Parameter(params[name].clone()))
        d = config.model.dim
        if self.backbone == "fedncf":
            widths = [2 * d, d, d // 2, d // 4]
            self.tower = nn.ModuleList([_linear(a, b, dtype) for a, b in zip(widths[:-1], widths[1:])])
            self.head = _linear(d // 4 + d, 1, dtype)
            d_id = params["fedmr_item"].shape[1] if "fedmr_item" in params else 1
        else:
            self.w = nn.Parameter(params["w"].clone())
            self.b = nn.Parameter(params["b"].clone())
            d_id = d
        self.fedmr = OracleFusion(self.fcfg, d_id, dims, dtype)
        own = dict(self.named_parameters())
        with torch.no_grad():
            for name, param in own.items():
                if name not in tables + ["w", "b"]:
                    param.copy_(params[name])
        assert set(own) == set(params), (sorted(set(own) ^ set(params)))

    def id_input(self, items: torch.Tensor) -> torch.Tensor | None:
        if "id" not in self.fcfg.modalities:
            return None
        if self.backbone == "fedrap":
            return self.item_personal[items] + self.item_global[items]
        if self.backbone == "fedncf":
            return self.fedmr_item[items]
        return self.item[items]

    def represent(self, items: torch.Tensor, mix_items: torch.Tensor, feats: dict) -> torch.Tensor:
        """z [N, d_f] of the rows `items`; alpha from the rows `mix_items` (S_u)."""
        fusion = self.fedmr
        mine = {m: f[items] for m, f in feats.items()}
        ex = fusion.experts(self.id_input(items), mine, items)
        if self.fcfg.fusion != "moe":
            return ex[self.fcfg.fusion]
        theirs = {m: f[mix_items] for m, f in feats.items()}
        s = fusion.route(fusion.experts(self.id_input(mix_items), theirs, mix_items), mix_items)
        a = s.mean(dim=0)
        alpha = torch.softmax(a, dim=0) if self.fcfg.mixing_softmax == "double" else a
        return alpha[0] * ex["sum"] + alpha[1] * ex["mlp"] + alpha[2] * ex["gate"]

    def forward(self, items: torch.Tensor, mix_items: torch.Tensor, feats: dict) -> torch.Tensor:
        z = self.represent(items, mix_items, feats)
        if self.backbone != "fedncf":
            return z @ self.w + self.b
        n = len(items)  # additive variant: z_i added to both item towers
        x = torch.cat([self.user_mlp.expand(n, -1), self.item_mlp[items] + z], dim=1)
        for layer in self.tower:
            x = torch.relu(layer(x))
        gmf = self.user_mf.expand(n, -1) * (self.item_mf[items] + z)
        return self.head(torch.cat([x, gmf], dim=1))[:, 0]


def _fedmr_lr(config: ExperimentConfig, round_: int) -> float:
    base = config.train.lr
    if base is None:  # the FedMR code: lr 0.1, MM-FedNCF 0.01
        base = 0.01 if config.model.backbone == "fedncf" else 0.1
    decay = config.train.lr_decay if config.train.lr_decay is not None else (
        0.9 if config.model.backbone == "fedrap" else 1.0)
    return base * decay ** round_


def _features(data: PreparedDataset, config: ExperimentConfig, dtype) -> dict[str, torch.Tensor]:
    return {m: torch.as_tensor(np.asarray(data.features[m])).to(dtype)
            for m in config.model.fusion.modalities if m != "id"}


def _mixing_rows(config, data, user: int, batch_items: torch.Tensor) -> torch.Tensor:
    if config.model.fusion.mixing_source == "history":
        return torch.as_tensor(data.train_items[data.train_indptr[user]:data.train_indptr[user + 1]],
                               dtype=torch.int64)
    return batch_items


def train_client_fedmr(config: ExperimentConfig, data: PreparedDataset, user: int, params: dict[str, torch.Tensor],
                       round_: int, kd: OracleKD | None = None
                       ) -> tuple[dict[str, torch.Tensor], ClientLog, dict[str, torch.Tensor]]:
    """Local training of one FedMR client (kd: its GFMFR distillation). Returns (trained
    params, log, last-batch gradients of the global fusion parameters)."""
    backbone, train = config.model.backbone, config.train
    dtype = next(iter(params.values())).dtype
    feats = _features(data, config, dtype)
    dims = {m: f.shape[1] for m, f in feats.items()}
    model = FedMRClient(config, params, dims)
    lr = _fedmr_lr(config, round_)
    n = data.n_items
    item_lr = {"fedavg": lr, "fedncf": lr, "fcf": lr * n, "fedrap": lr * n,
               "pfedrec": lr * n * config.model.pfedrec_eta}[backbone]
    id_tables = {"item", "item_personal", "item_global"}  # fedmr_item and NCF tables: lr
    named = dict(model.named_parameters())
    tables = [p for k, p in named.items() if k in id_tables]
    rest = [p for k, p in named.items() if k not in id_tables]

    def groups(names):
        return [{"params": [p], "lr": _group_lr(config, round_, n, k, item_lr if k in id_tables else lr)}
                for k, p in named.items() if k in names]

    two_step = backbone == "pfedrec" and config.model.pfedrec_update == "two_step"
    if two_step:
        opt_a = torch.optim.SGD(groups(set(named) - id_tables), lr=lr, momentum=0.0)
        opt_b = torch.optim.SGD(groups(id_tables), lr=item_lr, momentum=0.0)
    else:
        opt = torch.optim.SGD(groups(set(named)), lr=lr, momentum=0.0)

    def loss_of(items, labels, mix, update=True):
        logits = model(items, mix, feats)
        bce = F.binary_cross_entropy_with_logits(logits, labels)
        loss = bce + _fedrap_terms(config, model, items, round_)
        return loss if kd is None else loss + kd.term(logits, items, bce, update)

    def train_step(epoch, batch, items, labels) -> float:
        mix = _mixing_rows(config, data, user, items)
        model.fedmr.drop_key = (train.seed, round_, epoch, batch, user)
        if two_step:
            for p in tables:
                p.requires_grad_(False)
            opt_a.zero_grad()
            loss = loss_of(items, labels, mix)
            loss.backward()
            opt_a.step()
            for p in tables:
                p.requires_grad_(True)
            for p in rest:
                p.requires_grad_(False)
            opt_b.zero_grad()
            loss_of(items, labels, mix, update=False).backward()  # same masks: same step
            opt_b.step()
            for p in rest:
                p.requires_grad_(True)
        else:
            opt.zero_grad()
            loss = loss_of(items, labels, mix)
            loss.backward()
            opt.step()
        return loss.item()

    log = _local_epochs(config, data, user, round_, dtype, train_step)
    model.fedmr.drop_key = None
    trained = {k: p.detach().clone() for k, p in model.named_parameters()}
    if config.model.gfmfr is not None and config.model.fusion.fusion == "moe":
        with torch.no_grad():  # GFMFR's upload: alpha_u over H_u in eval mode
            history = torch.as_tensor(data.train_items[data.train_indptr[user]:data.train_indptr[user + 1]],
                                      dtype=torch.int64)
            s = model.fedmr.route(model.fedmr.experts(model.id_input(history), {m: f[history] for m, f in feats.items()},
                                                      history), history).mean(0)
            trained["gfmfr.alpha"] = torch.softmax(s, 0) if config.model.fusion.mixing_softmax == "double" else s
    grads = {k: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
             for k, p in model.named_parameters() if k.startswith("fedmr.") and not _fedmr_is_personal(config, k)}
    return trained, log, grads


def oracle_round_fedmr(config: ExperimentConfig, data: PreparedDataset, state: DenseState, round_: int,
                       dtype=torch.float64, logs: dict[int, ClientLog] | None = None) -> DenseState:
    """One FedMR round, clients one after the other; the server averages weights (fedavg) or
    takes one torch.optim.Adam step on the averaged last-batch gradients (grad_adam)."""
    backbone, fcfg = config.model.backbone, config.model.fusion
    downloaded = {name: value.to(dtype) for name, value in state.globals.items()}
    users = round_users(config, data.train_counts, round_).arrived
    new_personal = dict(state.personal)
    uploads, weights, grads = [], [], []
    gfmfr = config.model.gfmfr
    server = dict(state.server)
    rhos = _start_rhos(config, server, data.n_users) if gfmfr is not None else {}
    finals, trained_by_user = [], {}
    for user in users.tolist():
        params = copy.deepcopy(downloaded)
        personal = {name: value.to(dtype).clone() for name, value in state.personal[user].items()}
        if backbone == "pfedrec":
            personal.pop("item", None)
        params.update(personal)
        kd = _oracle_kd(config, server, rhos, user, round_) if gfmfr is not None else None
        trained, log, last = train_client_fedmr(config, data, user, params, round_, kd)
        if kd is not None:
            rhos[user] = kd.rho
            if not math.isnan(kd.rho):
                finals.append(kd.rho)
        trained_by_user[user] = trained
        if logs is not None:
            logs[user] = log
        uploads.append({name: trained[name] for name in downloaded})
        grads.append(last)
        weights.append(float(log.rows) if backbone == "fedavg" else 1.0)
        mine = {name: trained[name] for name in trained if _fedmr_is_personal(config, name)}
        mine.pop("gfmfr.alpha", None)
        if backbone == "pfedrec":
            mine["item"] = trained["item"]
        new_personal[user] = mine
    if not uploads:
        return DenseState(globals=downloaded, personal=new_personal, server=server)
    total = sum(weights)
    new_globals = {name: sum(w / total * up[name] for w, up in zip(weights, uploads)) for name in downloaded}
    if config.privacy is not None:
        sent = grads if fcfg.fusion_agg == "grad_adam" else [{} for _ in grads]
        mean = _private_mean(config, downloaded, uploads, sent, round_)
        new_globals = {name: downloaded[name] + mean[name] for name in downloaded}
    if fcfg.fusion_agg == "grad_adam":
        names = sorted(grads[0])
        if "adam" not in server:
            held = {name: nn.Parameter(downloaded[name].clone()) for name in names}
            base = fcfg.server_lr if fcfg.server_lr is not None else _fedmr_lr(config, 0)
            server["adam"] = (held, torch.optim.Adam(list(held.values()), lr=base, betas=(0.9, 0.999), eps=1e-8))
        held, adam = server["adam"]
        with torch.no_grad():
            for name in names:
                held[name].copy_(downloaded[name])
                held[name].grad = (mean[name] if config.privacy is not None
                                   else sum(w / total * g[name] for w, g in zip(weights, grads)))
        if fcfg.server_clip is not None:
            torch.nn.utils.clip_grad_norm_([held[name] for name in names], fcfg.server_clip)
        adam.step()
        for name in names:
            new_globals[name] = held[name].detach().clone()
    if gfmfr is not None:
        _end_rhos(config, server, rhos, finals)
        fuse = _fedmr_teacher_input(config, data, new_globals, dtype)
        _oracle_group_step(config, data, server, round_, users.tolist(), trained_by_user, dtype,
                           table="fedmr_item" if backbone == "fedncf" else None, fuse=fuse)
    return DenseState(globals=new_globals, personal=new_personal, server=server)


def _private_mean(config: ExperimentConfig, downloaded: dict, trained: list[dict], grads: list[dict],
                  round_: int) -> dict:
    """DP-FedAvg: name -> (sum over clients of min(1, C / ||u_c||) u_c + noise) / n, where u_c is
    client c's update as one vector: trained - downloaded for every global, or its last-batch
    gradient for the names in grads[c]; the noise is the server's, N(0, (sigma C)^2)."""
    privacy = config.privacy
    updates = [{name: g[name] if name in g else up[name] - downloaded[name] for name in downloaded}
               for up, g in zip(trained, grads)]
    noise = gaussian_noise({name: tuple(v.shape) for name, v in downloaded.items()},
                           privacy.noise_multiplier * privacy.clip, config.train.seed, round_,
                           next(iter(downloaded.values())).dtype)
    total = {name: noise[name].clone() for name in downloaded}
    for update in updates:
        norm = math.sqrt(sum(float(v.double().square().sum()) for v in update.values()))
        factor = min(1.0, privacy.clip / norm) if norm > 0 else 1.0
        for name in downloaded:
            total[name] += factor * update[name]
    return {name: value / len(updates) for name, value in total.items()}


def _fedmr_teacher_input(config: ExperimentConfig, data: PreparedDataset, new_globals: dict, dtype):
    """z_{g,i} through the aggregated module in eval mode, mixed by the group's mean alpha."""
    fcfg = config.model.fusion
    feats = _features(data, config, dtype)
    d_id = new_globals["fedmr.proj.id.weight"].shape[1]
    module = OracleFusion(fcfg, d_id, {m: f.shape[1] for m, f in feats.items()}, dtype)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if f"fedmr.{name}" in new_globals:  # a local router stays out: the teacher mixes by alpha
                param.copy_(new_globals[f"fedmr.{name}"])

    def fuse(z: torch.Tensor, members: list[dict]) -> torch.Tensor:
        items = torch.arange(len(z))
        ex = module.experts(z, feats, items)
        if fcfg.fusion != "moe":
            return ex[fcfg.fusion]
        alpha = torch.stack([m["gfmfr.alpha"] for m in members]).mean(0)
        return alpha[0] * ex["sum"] + alpha[1] * ex["mlp"] + alpha[2] * ex["gate"]

    return fuse


def oracle_scores_fedmr(config: ExperimentConfig, data: PreparedDataset, state: DenseState, users: list[int],
                        candidates: torch.Tensor | None = None) -> torch.Tensor:
    """[B, n_items] logits in eval mode; alpha from the user's history, or (batch mixing) from
    the scored items: all items, or the user's row of `candidates` [B, n_items] bool."""
    out = []
    with torch.no_grad():
        for row, user in enumerate(users):
            params = dict(state.globals)
            personal = dict(state.personal[int(user)])
            if config.model.backbone == "pfedrec" and (config.model.pfedrec_eval_table == "global"
                                                      or "item" not in personal):
                personal.pop("item", None)
            dtype = next(iter(params.values())).dtype
            params.update({k: v.to(dtype) for k, v in personal.items()})
            feats = _features(data, config, dtype)
            model = FedMRClient(config, params, {m: f.shape[1] for m, f in feats.items()})
            items = torch.arange(data.n_items)
            if config.model.fusion.mixing_source == "history":
                mix = _mixing_rows(config, data, int(user), items)
            else:
                mix = items if candidates is None else torch.nonzero(candidates[row]).squeeze(1)
            out.append(model(items, mix, feats))
    return torch.stack(out)
