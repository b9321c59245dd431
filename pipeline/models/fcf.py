"""FCF: FedAvg's model (global Q, personal linear head) with item lr = lr * n and a
uniform mean over participants."""

from __future__ import annotations

from pipeline.models import recipes

from pipeline.models.fedavg import (FUSION_PLUG, GLOBAL_DENSE, GLOBAL_TABLES, GROUP_TABLE,  # noqa: F401
                                    GROUP_VECTOR, ITEM_INPUT, LR_GROUPS, MODALITIES, PERSONAL_DENSE, PERSONAL_TABLES,
                                    FUSION, UPLOAD_GRADS, fuse_teacher, init, item_input, logits, row_regulariser, score,
                                    teacher_logits)

AGGREGATION = "uniform"
KEEP_TRAINED_COPY: tuple[str, ...] = ()
TWO_STEP_GROUPS: tuple[tuple[str, ...], ...] = ()


def lr_scale(n_items: int, config) -> dict[str, float]:
    return {"item": float(n_items), "w": 1.0, "b": 1.0}


# Training recipes (train.preset; docs/recipes.md). The FedMR authors' learning rate, alone and
# with their fusion module (train.preset=fedmr_reference)
REFERENCE_LR = 0.1
REFERENCE_LR_DECAY = 1.0
REFERENCE_FEDMR_LR = 0.1
# preset -> defaults under what a config gives. default: the PFedRec paper's FedMF setting
RECIPES = {"default": recipes.FEDMF_PAPER, "fedmr_reference": {}, "fedmf_paper": recipes.FEDMF_PAPER}
