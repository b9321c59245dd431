"""Which sampled clients' uploads arrive in a round: dropouts and stragglers, simulated.

Pure functions (no Ray). A client's round is atomic: it keeps its new local state only when its
upload arrives, so a client that drops out or misses the deadline keeps the state it had, and
the round aggregates what arrived (the aggregate's weights are normalised over the arrived
clients). Both draws are a pure function of (seed, round), made by the server; the pools then
train the arrived clients only, which is the same as training everyone and discarding the rest.

Dropout: each sampled client fails with probability train.dropout.
Deadline: client u's simulated time is its local work (training positives x (1 + neg_ratio)
x local epochs) over a device speed exp(speed_spread * z), z ~ N(0, 1) drawn each round; a
client slower than train.deadline x the round's median simulated time is a straggler.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_ARRIVAL_TAG = 0xA77E


@dataclass(frozen=True)
class Arrivals:
    """Sorted user ids of a round: sampled = arrived + dropped + late (disjoint)."""

    arrived: np.ndarray
    dropped: np.ndarray
    late: np.ndarray

    @property
    def sampled(self) -> int:
        return len(self.arrived) + len(self.dropped) + len(self.late)


def arrivals(users: np.ndarray, train_counts: np.ndarray, train, round_: int) -> Arrivals:
    """Split the round's sampled `users` (sorted) under train.dropout and train.deadline."""
    users = np.asarray(users, dtype=np.int64)
    empty = np.zeros(0, dtype=np.int64)
    if train.dropout == 0 and train.deadline is None:
        return Arrivals(users, empty, empty)
    rng = np.random.default_rng([train.seed, round_, _ARRIVAL_TAG])
    fails = rng.random(len(users)) < train.dropout  # drawn first: dropouts do not depend on the deadline
    speed = np.exp(train.speed_spread * rng.standard_normal(len(users)))
    late = np.zeros(len(users), dtype=bool)
    if train.deadline is not None and len(users):
        seconds = np.asarray(train_counts)[users] * (1 + train.neg_ratio) * train.local_epochs / speed
        late = (seconds > train.deadline * np.median(seconds)) & ~fails
    return Arrivals(users[~fails & ~late], users[fails], users[late])
