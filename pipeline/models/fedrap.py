"""FedRAP: personal item table P_u [I, d] + global item table C [I, d] + personal head.

score(u, i) = sigma(w_u . (p_{u,i} + c_i) + b_u).
Loss on a batch B: BCE - lambda_t * MSE(P_B, C_B) + mu_t * R(C_B), R = mean |c| (L1) or mean c^2,
lambda_t = tanh(t / 10) * lambda_base, mu_t likewise (t = 0-based round; never compounded), or
the base values in every round (model.fedrap_schedule=constant, as the FedRAP code reads them).
Item lr = lr * n for P and C; every client lr decays x lr_decay per round (0.9).
"""

from __future__ import annotations

import math

import torch

from pipeline.models import recipes
from pipeline.models.base import InitialState, RowContext, embedding, linear_head, linear_head_init, linear_head_teacher

GLOBAL_TABLES = ("item_global",)
GLOBAL_DENSE: tuple[str, ...] = ()
PERSONAL_DENSE = ("w", "b")
PERSONAL_TABLES = ("item_personal",)
AGGREGATION = "uniform"
GROUP_TABLE = "item_global"  # GFMFR: groups regress the mean of their members' C_u
GROUP_VECTOR = ("w", "b")
teacher_logits = linear_head_teacher
# what FedRAP has none of (pipeline.models.base.Method); its row_regulariser is below
KEEP_TRAINED_COPY: tuple[str, ...] = ()
UPLOAD_GRADS: tuple[str, ...] = ()
TWO_STEP_GROUPS: tuple[tuple[str, ...], ...] = ()
MODALITIES: tuple[str, ...] = ()
fuse_teacher = None
FUSION = None


LR_GROUPS = {"item_global": "item_global", "item_personal": "item_personal", "w": "head", "b": "head"}


def init(n_users: int, n_items: int, dim: int, generator: torch.Generator, scheme: str = "xavier") -> InitialState:
    item_global = embedding((n_items, dim), generator, scheme)
    item_personal = embedding((n_items, dim), generator, scheme)
    return InitialState(global_params={"item_global": item_global},
                        personal_shared=linear_head_init(dim, generator, scheme),
                        personal_table_base={"item_personal": item_personal})


def lr_scale(n_items: int, config) -> dict[str, float]:
    return {"item_global": float(n_items), "item_personal": float(n_items), "w": 1.0, "b": 1.0}


FUSION_PLUG = "input"
ITEM_INPUT = ("item_personal", "item_global")  # item_input = their sum; score: the linear head


def item_input(ctx: RowContext) -> torch.Tensor:
    """[R, d] p_{u,i} + c_i (FedMR's e_i)."""
    return ctx.table("item_personal") + ctx.table("item_global")


def score(ctx: RowContext, item: torch.Tensor) -> torch.Tensor:
    return linear_head(ctx, item)


def logits(ctx: RowContext) -> torch.Tensor:
    return score(ctx, item_input(ctx))


def ramp(round_: int, base: float, schedule: str = "ramp") -> float:
    """tanh(t / 10) * base: 0 in round 0, -> base; a pure function of (t, base). schedule
    'constant': base in every round."""
    return base if schedule == "constant" else math.tanh(round_ / 10.0) * base


def row_regulariser(ctx: RowContext, round_: int, config) -> torch.Tensor:
    """[R] per-row extra loss; its per-client mean over a batch equals
    -lambda_t * MSE(P_B, C_B) + mu_t * R(C_B) of that client's batch."""
    p, c = ctx.table("item_personal"), ctx.table("item_global")
    schedule = config.fedrap_schedule
    lam, mu = ramp(round_, config.fedrap_lambda, schedule), ramp(round_, config.fedrap_mu, schedule)
    reg = c.abs() if config.fedrap_reg == "l1" else c.square()
    return -lam * (p - c).square().mean(-1) + mu * reg.mean(-1)

# Training recipes (train.preset; docs/recipes.md). The FedMR authors' learning rate and per-round
# decay, alone and with their fusion module (train.preset=fedmr_reference)
REFERENCE_LR = 0.1
REFERENCE_LR_DECAY = 0.9
REFERENCE_FEDMR_LR = 0.1
# the FedRAP authors' code (mtics/FedRAP): 10 epochs (tol 1e-4) of 2048-row batches, head 0.5, P and
# C 200, weight decay 1e-4, x0.97 per round and x0.95 per batch, lambda and mu constant at 0.1
PAPER = recipes.merged(recipes.TORCH_32, {
    "model": {"fedrap_lambda": 0.1, "fedrap_mu": 0.1, "fedrap_reg": "l1", "fedrap_schedule": "constant"},
    "train": {"local_epochs": 10, "tol": 1e-4, "batch_rows": 2048, "neg_ratio": 4, "neg_draw": "round",
              "lr_groups": {"head": 0.5, "item_personal": 200.0, "item_global": 200.0},
              "lr_decay": 0.97, "lr_batch_decay": 0.95, "weight_decay": 1e-4, "patience": 100}})
# default: C at 0.1 x n x 320, P at 0.0226, both regularisers off (lambda = mu = 0), in the paper
# loop: the sweep's best; without weight decay FedRAP's -lambda MSE(P, C) has no lower bound and
# diverges at lambda = 0.1
RECIPES = {"default": recipes.merged(recipes.TORCH_32, {
               "model": {"fedrap_lambda": 0.0, "fedrap_mu": 0.0},
               "train": {**recipes.PAPER_LOOP, "lr_groups": {"item_global": "32*n", "item_personal": 0.0226}}}),
           "fedmr_reference": {}, "fedrap_paper": PAPER}
