"""PFedRec: global Q, personal head, and a personal fine-tuned copy Q~_u of Q.

Each round Q~_u starts from the downloaded Q; every mini-batch takes (a) one SGD step on the
head with Q~_u frozen, then (b) one step on Q~_u with the updated head (`two_step`), or one
joint step (`joint`). Q~_u is uploaded; the server sets Q to the uniform mean.
score(u, i) = sigma(w_u . q~_{u,i} + b_u).  Item lr = lr * n * eta.

In training the fine-tuned copy is the round's table "item"; between rounds the pool keeps it
as the user's personal table "item" (what evaluation reads).
"""

from __future__ import annotations

import torch

from pipeline.models.base import InitialState, RowContext, linear_head, linear_head_init, xavier

GLOBAL_TABLES = ("item",)
GLOBAL_DENSE: tuple[str, ...] = ()
PERSONAL_DENSE = ("w", "b")
PERSONAL_TABLES: tuple[str, ...] = ()
KEEP_TRAINED_COPY = ("item",)  # the fine-tuned Q~_u persists as the user's evaluation table
AGGREGATION = "uniform"
TWO_STEP_GROUPS = (("w", "b"), ("item",))


def init(n_users: int, n_items: int, dim: int, generator: torch.Generator) -> InitialState:
    item = xavier((n_items, dim), generator)
    return InitialState(global_params={"item": item}, personal_shared=linear_head_init(dim, generator))


def lr_scale(n_items: int, config) -> dict[str, float]:
    return {"item": float(n_items) * config.pfedrec_eta, "w": 1.0, "b": 1.0}


FUSION_PLUG = "input"


def item_input(ctx: RowContext) -> torch.Tensor:
    """[R, d] q~_{u,i}, the client's fine-tuned copy (FedMR's e_i)."""
    return ctx.table("item")


def score(ctx: RowContext, item: torch.Tensor) -> torch.Tensor:
    return linear_head(ctx, item)


def logits(ctx: RowContext) -> torch.Tensor:
    return score(ctx, item_input(ctx))
