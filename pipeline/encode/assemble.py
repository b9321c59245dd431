"""Join stage outputs on item id and fill the rows of items without usable content.

Shapes: n = catalogue items (ids ascending), k = rows a stage returned (any order), d = width.
"""

from __future__ import annotations

import numpy as np

from pipeline.data.prepare import l2_normalise


def join_on_item_id(item_ids: np.ndarray, stage_ids: np.ndarray, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Place stage rows at their item's row.

    item_ids: [n] ascending; stage_ids: [k] (each at most once, all in item_ids); features: [k, d].
    Returns (float32 [n, d] with zero rows for absent items, [n] bool: row came from the stage).
    """
    stage_ids = np.asarray(stage_ids).astype(item_ids.dtype, copy=False)
    pos = np.searchsorted(item_ids, stage_ids)
    pos_ok = pos < len(item_ids)
    if not pos_ok.all() or not (item_ids[pos] == stage_ids).all():
        unknown = stage_ids[~pos_ok] if not pos_ok.all() else stage_ids[item_ids[pos] != stage_ids]
        raise ValueError(f"the stage returned item ids that are not in the catalogue: {unknown[:5].tolist()}")
    if np.unique(pos).size != pos.size:
        raise ValueError("the stage returned an item id more than once")
    matrix = np.zeros((len(item_ids), features.shape[1] if features.ndim == 2 else 0), dtype=np.float32)
    matrix[pos] = features
    present = np.zeros(len(item_ids), dtype=bool)
    present[pos] = True
    return matrix, present


def fill_with_mean(matrix: np.ndarray, good: np.ndarray) -> np.ndarray:
    """Rows where `good` is False get the L2-normalised mean of the good rows.

    matrix: float32 [n, d] (good rows unit norm); good: [n] bool with at least one True.
    """
    if not good.any():
        raise ValueError("no good row to average")
    out = matrix.copy()
    if not good.all():
        out[~good] = l2_normalise(matrix[good].mean(axis=0, keepdims=True))
    return out
