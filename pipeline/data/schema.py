"""Typed containers for raw datasets, as loaders return them.

Raw ids are whatever the source file uses (ints or strings); the protocols in
:mod:`pipeline.data.prepare` remap them to contiguous 0-based ids.

Shapes: N = interaction rows, M = catalogue rows, d_m = feature width of modality m.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class DataError(ValueError):
    """Bad input. The one error type every loader raises.

    The message always names the file, and where known the row (1-based, as a
    text editor shows it, header included) and the column, then the reason.
    """

    def __init__(self, file, reason: str, *, row: int | None = None, column: str | None = None):
        self.file = str(file)
        self.row = row
        self.column = column
        self.reason = reason
        where = self.file
        if row is not None:
            where += f", row {row}"
        if column is not None:
            where += f", column {column!r}"
        super().__init__(f"{where}: {reason}")


# split labels of a predefined split (FedMR/MMRec `split_label`)
TRAIN, VALID, TEST = 0, 1, 2


@dataclass(frozen=True)
class Interactions:
    """Implicit-feedback log, one row per observed interaction, in file order.

    user, item: [N] raw ids (int64 or str objects).
    timestamp:  [N] int64 or float64; ordering key (ties broken by file order).
    rating:     [N] float32 or None (already implicit).
    split:      [N] int8 predefined split labels (TRAIN/VALID/TEST) or None.
    """

    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    rating: np.ndarray | None = None
    split: np.ndarray | None = None

    def __post_init__(self):
        n = len(self.user)
        for name in ("item", "timestamp", "rating", "split"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"Interactions.{name} has {len(value)} rows, user has {n}")

    def __len__(self) -> int:
        return len(self.user)


@dataclass(frozen=True)
class Catalogue:
    """Item content. item_id: [M] raw ids; text: [M] str ('' = no text);
    image: [M] str paths ('' = no image); title: [M] str ('' = none), or None when the source
    has no title column (recommendations then show the text's first line)."""

    item_id: np.ndarray
    text: np.ndarray
    image: np.ndarray
    title: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.item_id)


@dataclass(frozen=True)
class Features:
    """Precomputed item features. item_id: [M] raw ids, row r of every matrix
    belongs to item_id[r]; matrices: modality name -> float32 [M, d_m]."""

    item_id: np.ndarray
    matrices: dict[str, np.ndarray] = field(default_factory=dict)

    def shapes(self) -> dict[str, list[int]]:
        return {name: list(m.shape) for name, m in self.matrices.items()}


@dataclass(frozen=True)
class RawDataset:
    """What a loader returns: interactions plus optional content and features.

    name: short label for tables. source: dict of files read (for fingerprints and stats).
    """

    name: str
    interactions: Interactions
    catalogue: Catalogue | None = None
    features: Features | None = None
    source: dict = field(default_factory=dict)
