"""FedMR / MMRec format: a directory with ``inter.csv`` and optional feature matrices.

``inter.csv``: header ``userID,itemID,rating,timestamp[,split_label]`` (MMRec's
``x_label`` is accepted for ``split_label``; ``rating`` may be absent).
``text_features.npy`` / ``image_features.npy``: float [n_items, d], row r = itemID r.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.loaders import _read
from pipeline.data.schema import DataError, Features, Interactions, RawDataset

INTERACTIONS = "inter.csv"
FEATURE_FILES = {"text": "text_features.npy", "image": "image_features.npy"}
KEYS = ("userID", "itemID", "timestamp")
SPLIT_COLUMNS = ("split_label", "x_label")


def load(path, *, allow_duplicates: bool = False, skip_missing: bool = False) -> RawDataset:
    """Read and validate a FedMR/MMRec dataset directory.

    Returns interactions [N] (int64 ids, timestamps, float32 rating, int8 split when the
    file has one) and, when feature files exist, Features with item_id = arange(n_items)
    and float32 matrices [n_items, d_m]. A row with an empty userID/itemID/timestamp
    is refused, or with skip_missing dropped and counted in ``source['dropped_missing']``.
    """
    root = _read.require_dir(path)
    table = _read.read_text_table(root / INTERACTIONS)
    _read.require_columns(table, KEYS)
    n_read = len(table.frame)
    table, dropped = _read.drop_missing(table, KEYS, skip=skip_missing)
    interactions = _parse_interactions(table, allow_duplicates)
    features = _load_features(root)
    if features is not None:
        _check_item_range(interactions.item, features, table)
    files = {"interactions": str(table.path)}
    files.update({f"{m}_features": str(root / FEATURE_FILES[m]) for m in (features.matrices if features else {})})
    source = {"format": "fedmr", "path": str(root), "files": files, "rows_read": n_read, "dropped_missing": dropped}
    return RawDataset(root.name, interactions, None, features, source)


def _parse_interactions(table: _read.Table, allow_duplicates: bool) -> Interactions:
    frame, where = table.frame, table.where()
    user = _read.parse_ids(frame["userID"], where, "userID")
    item = _read.parse_ids(frame["itemID"], where, "itemID")
    ts = _read.parse_numbers(frame["timestamp"], where, "timestamp", what="timestamp")
    rating = _read.parse_ratings(frame["rating"], where, "rating") if "rating" in frame else None
    split_col = next((c for c in SPLIT_COLUMNS if c in frame), None)
    split = _read.parse_split(frame[split_col], where, split_col) if split_col else None
    if not allow_duplicates:
        _read.check_duplicates({"user": user, "item": item, "timestamp": ts}, where)
    return Interactions(user, item, ts, rating, split)


def _load_features(root: Path) -> Features | None:
    """Features of whichever modality files exist; None if there are none."""
    matrices = {m: _read.read_matrix(root / f) for m, f in FEATURE_FILES.items() if (root / f).exists()}
    if not matrices:
        return None
    rows = {m: x.shape[0] for m, x in matrices.items()}
    if len(set(rows.values())) > 1:
        shown = ", ".join(f"{FEATURE_FILES[m]} has {n}" for m, n in rows.items())
        raise DataError(root / FEATURE_FILES["image"], f"feature row counts disagree: {shown}")
    n = next(iter(rows.values()))
    return Features(item_id=np.arange(n, dtype=np.int64), matrices=matrices)


def _check_item_range(item: np.ndarray, features: Features, table: _read.Table) -> None:
    n = len(features.item_id)
    table.where().fail(
        item >= n,
        "itemID",
        lambda v: f"itemID {v} out of range: feature matrices have {n} rows (max itemID {n - 1}; "
        f"max itemID in file {int(item.max())})",
        item,
    )
