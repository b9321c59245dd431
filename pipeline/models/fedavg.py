"""FedAvg: global item table Q [I, d] + personal linear head (w_u [d], b_u).

score(u, i) = sigma(w_u . q_i + b_u). Item lr = lr; sample-weighted aggregation of Q.
"""

from __future__ import annotations

import torch

from pipeline.models import recipes
from pipeline.models.base import InitialState, RowContext, embedding, linear_head, linear_head_init, linear_head_teacher

GLOBAL_TABLES = ("item",)
GLOBAL_DENSE: tuple[str, ...] = ()
PERSONAL_DENSE = ("w", "b")
PERSONAL_TABLES: tuple[str, ...] = ()
AGGREGATION = "weighted"
# GFMFR: the table a group's target averages, and the grouping vector x_u
GROUP_TABLE = "item"
GROUP_VECTOR = ("w", "b")
teacher_logits = linear_head_teacher
# what FedAvg has none of (pipeline.models.base.Method)
KEEP_TRAINED_COPY: tuple[str, ...] = ()
UPLOAD_GRADS: tuple[str, ...] = ()
TWO_STEP_GROUPS: tuple[tuple[str, ...], ...] = ()
MODALITIES: tuple[str, ...] = ()
row_regulariser = None
fuse_teacher = None
FUSION = None


LR_GROUPS = {"item": "item", "w": "head", "b": "head"}  # parameter -> its group in train.lr_groups


def init(n_users: int, n_items: int, dim: int, generator: torch.Generator, scheme: str = "xavier") -> InitialState:
    item = embedding((n_items, dim), generator, scheme)
    return InitialState(global_params={"item": item}, personal_shared=linear_head_init(dim, generator, scheme))


def lr_scale(n_items: int, config) -> dict[str, float]:
    """Multiplier of the client lr per parameter."""
    return {"item": 1.0, "w": 1.0, "b": 1.0}


FUSION_PLUG = "input"  # FedMR fuses item_input(ctx) and score() scores the fused vector
# item_input(ctx) is the sum of these tables' rows and score() the linear head w_u . r + b_u:
# evaluation scores a block of users as matrix products (pipeline/federated/engine/scoring.py)
ITEM_INPUT = ("item",)


def item_input(ctx: RowContext) -> torch.Tensor:
    """[R, d] the item's ID embedding q_i (FedMR's e_i)."""
    return ctx.table("item")


def score(ctx: RowContext, item: torch.Tensor) -> torch.Tensor:
    """[R, k] item representations -> [R] logits through the personal head."""
    return linear_head(ctx, item)


def logits(ctx: RowContext) -> torch.Tensor:
    """[R] logits."""
    return score(ctx, item_input(ctx))


# Training recipes (train.preset; docs/recipes.md). The FedMR authors' learning rate for this
# backbone, alone and with their fusion module (train.preset=fedmr_reference)
REFERENCE_LR = 0.01
REFERENCE_LR_DECAY = 1.0
REFERENCE_FEDMR_LR = 0.1
# preset -> defaults under what a config gives. default: the PFedRec paper's FedMF setting
# (the best validation HR@10 on MovieLens-100K P1 with symmetric negatives, results/sweeps/)
RECIPES = {"default": recipes.FEDMF_PAPER, "fedmr_reference": {}, "fedmf_paper": recipes.FEDMF_PAPER}
