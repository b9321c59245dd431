"""FCF: FedAvg's model (global Q, personal linear head) with item lr = lr * n and a
uniform mean over participants."""

from __future__ import annotations

from pipeline.models.fedavg import (FUSION_PLUG, GLOBAL_DENSE, GLOBAL_TABLES, PERSONAL_DENSE,  # noqa: F401
                                    PERSONAL_TABLES, init, item_input, logits, score)

AGGREGATION = "uniform"


def lr_scale(n_items: int, config) -> dict[str, float]:
    return {"item": float(n_items), "w": 1.0, "b": 1.0}
