"""PFedRec: global Q, personal head, and a personal fine-tuned copy Q~_u of Q.

Each round Q~_u starts from the downloaded Q; every mini-batch takes (a) one SGD step on the
head with Q~_u frozen, then (b) one step on Q~_u with the updated head (`two_step`), or one
joint step (`joint`). Q~_u is uploaded; the server sets Q to the uniform mean.
score(u, i) = sigma(w_u . q~_{u,i} + b_u).  Item lr = lr * n * eta.

In training the fine-tuned copy is the round's table "item"; between rounds the pool keeps it
as the user's personal table "item" (what evaluation reads).
"""

from __future__ import annotations

from pipeline.models import recipes

# the model is FedAvg's (global Q, personal linear head); what differs is the update rule,
# the item lr and that the trained copy of Q persists. item_input reads the round's copy.
from pipeline.models.fedavg import (FUSION_PLUG, GLOBAL_DENSE, GLOBAL_TABLES, GROUP_TABLE,  # noqa: F401
                                    GROUP_VECTOR, ITEM_INPUT, LR_GROUPS, MODALITIES, PERSONAL_DENSE, PERSONAL_TABLES,
                                    FUSION, UPLOAD_GRADS, fuse_teacher, init, item_input, logits, row_regulariser, score,
                                    teacher_logits)

KEEP_TRAINED_COPY = ("item",)  # the fine-tuned Q~_u persists as the user's evaluation table
AGGREGATION = "uniform"
TWO_STEP_GROUPS = (("w", "b"), ("item",))


def lr_scale(n_items: int, config) -> dict[str, float]:
    return {"item": float(n_items) * config.pfedrec_eta, "w": 1.0, "b": 1.0}

# Training recipes (train.preset; docs/recipes.md). The FedMR authors' learning rate, alone and
# with their fusion module (train.preset=fedmr_reference)
REFERENCE_LR = 0.1
REFERENCE_LR_DECAY = 1.0
REFERENCE_FEDMR_LR = 0.1
# the PFedRec authors' code (Zhangcx19/IJCAI-23-PFedRec): head lr 0.1, item table 0.1 x n x 80,
# 1 epoch of 256-row batches
PAPER = recipes.merged(recipes.TORCH_32, {"model": {"pfedrec_eta": 80.0}, "train": recipes.PAPER_LOOP})
# default: the paper's recipe, scored with the global item table: the fine-tuned copy overfits the
# round's negatives, which with symmetric negatives include the user's held-out items
RECIPES = {"default": recipes.merged(PAPER, {"model": {"pfedrec_eval_table": "global"}}),
           "fedmr_reference": {}, "pfedrec_paper": PAPER}
