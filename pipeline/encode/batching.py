"""Row order for batching: texts of similar length share a batch, so padding is small.

Features do not depend on the order (rows are joined on item id afterwards); the time does:
a batch is padded to its longest text, and catalogue order mixes 5-token titles with
250-token overviews.
"""

from __future__ import annotations

import numpy as np


def length_order(texts) -> np.ndarray:
    """[n] texts -> [n] int64 permutation, shortest first (stable)."""
    return np.argsort(np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts)), kind="stable")


def batches(n: int, batch_size: int):
    """Slices covering range(n) in steps of batch_size."""
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))
