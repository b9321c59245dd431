"""GFMFR on the server: its state across rounds and its group step.
Pure (no Ray): the Server actor feeds it the pools' uploads, the equivalence tests feed it
Shards directly.

Round t: the pools train (participants with a group distil TeacherDownload.scores), upload
their grouping vectors; `assign` groups this round's participants; the pools reduce their
members' trained tables per group (Shard.group_sums); `fit` trains the group fusion model on
the group means and computes the teacher scores the next round downloads.

Shapes: U = users, P = participants, F = grouping-vector width, G = groups, N = items.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch

from pipeline.federated.strategy.grouping import UNGROUPED, cluster_seed, group_users, keep_groups
from pipeline.federated.messages import TeacherDownload
from pipeline.models.base import InitialState
from pipeline.models.group_fusion import (GroupFusion, kd_schedule, target_scale, targets_from_sums,
                                         train_group_fusion)

_FUSION_SEED_TAG = 0x6F5  # the group fusion model's initialisation stream (from train.model_seed)


def new_group_fusion(config, width: int, feature_dims: dict[str, int], dtype=torch.float32) -> GroupFusion:
    """The seeded initial group fusion model f_phi of a run (from train.model_seed)."""
    cfg = config.model.gfmfr
    generator = torch.Generator().manual_seed(config.train.model_seed * 7919 + _FUSION_SEED_TAG)
    return GroupFusion(cfg.group_num, width, feature_dims, group_dim=cfg.group_emb_dim, fusion=cfg.group_fusion,
                       generator=generator).to(dtype)


def server_device(runtime) -> torch.device:
    """Where the group fusion model trains: the server's GPU when its process sees one
    (runtime.device auto or cuda), else the CPU; runtime.device=cpu keeps it on the CPU."""
    if runtime.device != "cpu" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def vector_shapes(model, initial: InitialState) -> dict[str, tuple[int, ...]]:
    """name -> shape of every part of the model's grouping vector (model.GROUP_VECTOR)."""
    known = {**initial.personal_shared, **initial.global_params}
    return {name: tuple(known[name].shape) for name in model.GROUP_VECTOR}


def group_means(values: torch.Tensor, ids: np.ndarray, n_groups: int) -> torch.Tensor:
    """[G, ...] mean of values [P, ...] over each group's members (ids [P]); empty groups 0."""
    index = torch.as_tensor(ids)
    sums = values.new_zeros(n_groups, *values.shape[1:]).index_add_(0, index, values)
    counts = torch.bincount(index, minlength=n_groups).clamp(min=1).to(values.dtype)
    return sums / counts.view(-1, *[1] * (values.dim() - 1))


class GroupServer:
    """The server's GFMFR state: memberships, the group fusion model f_phi, the teacher scores."""

    keep_target_scores = False  # diagnostics: fit also scores the groups' true target tables

    def __init__(self, config, model, initial: InitialState, features: dict[str, torch.Tensor],
                 n_users: int, n_items: int, dtype=torch.float32):
        self.config, self.model, self.cfg = config, model, config.model.gfmfr
        self.features = {m: x.to(dtype) for m, x in features.items() if m in ("text", "image")}
        if not self.features:
            raise ValueError("model.gfmfr needs text or image item features (the group fusion model maps content "
                             "to each group's item table): encode them, see `python -m pipeline encode --help`")
        self.shapes = vector_shapes(model, initial)
        self.n_items = n_items
        width = initial.global_params[model.GROUP_TABLE].shape[1]
        # f_phi and its copy of the features on the server's device; the teacher step on the CPU
        self.device = server_device(config.runtime)
        self.fusion = new_group_fusion(config, width, {m: x.shape[1] for m, x in self.features.items()},
                                       dtype).to(self.device)
        self.fusion_features = {m: x.to(self.device) for m, x in self.features.items()}
        self.known = np.full(n_users, UNGROUPED, dtype=np.int64)  # latest aligned id of every user
        self.group_of = np.full(n_users, UNGROUPED, dtype=np.int64)  # who distils next round, in which group
        self.scores: torch.Tensor | None = None  # [G, N] for the next round
        self.shared_rho = math.nan
        self.target_scores: torch.Tensor | None = None  # [G, N], set by fit when keep_target_scores
        self.planted = None  # group_method=planted: [U] the generator's taste groups
        if self.cfg.group_method == "planted":
            from pipeline.data.datasets import planted_groups

            self.planted = planted_groups(config.data)

    # -- what a round's pools receive -------------------------------------------------------

    def download(self, round_: int) -> TeacherDownload | None:
        """The teacher of round `round_` (None in round 0, before any group step)."""
        if self.scores is None:
            return None
        weight = kd_schedule(self.cfg.kd_schedule, round_, self.config.train.rounds)
        return TeacherDownload(scores=self.scores, group_of=self.group_of.copy(), weight=weight,
                               shared_rho=self.shared_rho)

    # -- the group step -----------------------------------------------------------------------

    def step(self, round_: int, uploads: list, reduce: Callable[[list[np.ndarray]], list],
             downloaded: dict[str, torch.Tensor], global_params: dict[str, torch.Tensor]) -> dict[str, float]:
        """The whole group step of round `round_` after aggregation, from the pools' Uploads (one
        per pool, in pool order): `assign`, then reduce(ids) -> [(sums [G, N, d], members [G])]
        with ids[k] the group ids of upload k's clients (the pools' group_sums: remote calls on
        the Server, Shard.group_sums in process), then `fit` from the round's downloaded globals
        and the aggregated ones. Returns its metrics: costs, groups, what crossed the network."""
        started = time.perf_counter()
        sent = [u for u in uploads if u.group_users is not None]
        users = np.concatenate([u.group_users for u in sent])
        vectors = torch.cat([u.group_vectors for u in sent])
        alphas = [u.group_alpha for u in sent if u.group_alpha is not None]
        ids = self.assign(round_, users, vectors)
        grouped = time.perf_counter()
        bounds = np.cumsum([0] + [len(u.group_users) if u.group_users is not None else 0 for u in uploads])
        parts = reduce([ids[a:b] for a, b in zip(bounds[:-1], bounds[1:])])
        reduced = time.perf_counter()
        rho = (sum(u.rho[0] for u in uploads), sum(u.rho[1] for u in uploads))
        metrics = self.fit(round_, users, ids, sum(p[0] for p in parts), sum(p[1] for p in parts),
                           downloaded[self.model.GROUP_TABLE], vectors, torch.cat(alphas) if alphas else None,
                           global_params, rho)
        distilled = sum(u.distilled for u in uploads)
        return {**metrics, "time/grouping_seconds": grouped - started, "time/group_reduce_seconds": reduced - grouped,
                "time/group_step_seconds": time.perf_counter() - started, "group/distilled_clients": distilled,
                "comm/teacher_bytes_down": distilled * self.n_items * self.scores.element_size(),
                "comm/group_bytes_up": int(sum(t.numel() * t.element_size() for t in (vectors, *alphas)))}

    def assign(self, round_: int, users: np.ndarray, vectors: torch.Tensor) -> np.ndarray:
        """[P] aligned group ids of this round's participants from their grouping vectors.
        With model.gfmfr.regroup_every = k > 1, rounds not a multiple of k reuse the grouping
        (keep_groups) unless none of the participants was grouped before."""
        users = np.asarray(users)
        every = self.cfg.regroup_every
        if every > 1 and round_ % every and self.cfg.group_method != "planted":
            kept = keep_groups(vectors.double().numpy(), users, self.known)
            if kept is not None:
                return kept
        return group_users(vectors.double().numpy(), users, self.cfg.group_num, method=self.cfg.group_method,
                           use_pca=self.cfg.use_pca, seed=self.config.train.seed, round_=round_,
                           previous=self.known, planted=self.planted)

    def fit(self, round_: int, users: np.ndarray, ids: np.ndarray, sums: torch.Tensor, members: torch.Tensor,
            downloaded_table: torch.Tensor, vectors: torch.Tensor, alpha: torch.Tensor | None,
            global_params: dict[str, torch.Tensor], rho: tuple[float, int] = (0.0, 0)) -> dict[str, float]:
        """Train f_phi on the group targets (the downloaded table + the groups' mean changes,
        sums [G, N, d] / members [G]), compute the teacher scores for the next round from the
        groups' mean heads (vectors [P, F]) and, with FedMR, the groups' mean mixing weights
        (alpha [P, 3]) through the aggregated module (global_params); update memberships.
        rho: (sum, count) of the clients' final rho (ema_scope=shared_round). Reports how far
        f_phi's tables are from the targets (group/fusion_relative_error: |f_phi - target| /
        |target| over the non-empty groups; 1 = no better than predicting zeros). f_phi trains
        on the server's device (server_device); model.gfmfr.server_tol may end its epochs early."""
        started = time.perf_counter()
        dtype = self.fusion.group.dtype
        targets = targets_from_sums(downloaded_table.to(dtype), sums.to(dtype), members)
        scale = target_scale(targets, members, self.cfg.server_target_scale)
        losses = self.train(targets / scale, members, cluster_seed(self.config.train.seed, round_))
        losses = [loss * scale ** 2 for loss in losses]  # in the targets' own units
        if not math.isfinite(losses[-1]):  # a hard failure, like a client's
            raise FloatingPointError(f"round {round_}: the group fusion model's loss is {losses[-1]} (the group "
                                     f"targets, the members' trained tables, have diverged)")
        fitted = time.perf_counter()
        n_groups = self.cfg.group_num
        with torch.no_grad():
            z = self.fusion.tables(self.fusion_features, self.n_items).cpu() * scale  # [G, N, d_c]
            nonempty = members > 0
            miss = float((z[nonempty] - targets[nonempty]).norm() / targets[nonempty].norm().clamp(min=1e-30))
            means = group_means(vectors.to(dtype), ids, n_groups)
            head, at = {}, 0
            for name, shape in self.shapes.items():
                size = int(np.prod(shape))
                head[name] = means[:, at:at + size].reshape(n_groups, *shape)
                at += size

            fused = self.model.fuse_teacher is not None
            if fused:
                mean_alpha = group_means(alpha.to(dtype), ids, n_groups) if alpha is not None else None
                params = {k: v.to(dtype) for k, v in global_params.items()}

            def teacher(table: torch.Tensor) -> torch.Tensor:
                """[G, N] s_g from the groups' item tables [G, N, d_c]."""
                if fused:
                    table = self.model.fuse_teacher(table, params, self.features, mean_alpha)
                out = torch.sigmoid(self.model.teacher_logits(head, table))
                out[~nonempty] = math.nan
                return out

            scores = teacher(z)
            self.target_scores = teacher(targets) if self.keep_target_scores else None
        self.scores = scores
        self.known[users] = ids
        if self.cfg.group_membership == "last_round":
            self.group_of = np.full_like(self.known, UNGROUPED)
            self.group_of[users] = ids
        else:
            self.group_of = self.known.copy()
        if self.cfg.ema_scope == "shared_round" and rho[1] > 0:
            self.shared_rho = rho[0] / rho[1]
        return {"time/group_fusion_seconds": fitted - started,
                "time/teacher_seconds": time.perf_counter() - fitted,
                "group/fusion_loss": losses[-1],
                "group/fusion_epochs": len(losses),
                "group/target_scale": scale,
                "group/fusion_relative_error": miss,
                "group/nonempty": int(nonempty.sum()),
                "group/largest": int(members.max())}

    def train(self, targets: torch.Tensor, members: torch.Tensor, seed: int,
              trainer: Callable = train_group_fusion) -> list[float]:
        """One round's training of f_phi on the group targets [G, N, d_c] (trainer: its
        implementation; bench.gfmfr_server passes the reference to time it). Returns the epochs' losses."""
        return trainer(self.fusion, targets.to(self.device), members, self.fusion_features,
                       epochs=self.cfg.server_epochs, lr=self.cfg.server_lr, weight_decay=self.cfg.server_weight_decay,
                       batch=self.cfg.server_batch, seed=seed, tol=self.cfg.server_tol)

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"fusion": {k: v.cpu() for k, v in self.fusion.state_dict().items()}, "known": self.known,
                "group_of": self.group_of, "scores": self.scores, "shared_rho": self.shared_rho}

    def load_state_dict(self, state: dict) -> None:
        self.fusion.load_state_dict(state["fusion"])
        self.known, self.group_of = state["known"].copy(), state["group_of"].copy()
        self.scores, self.shared_rho = state["scores"], state["shared_rho"]
