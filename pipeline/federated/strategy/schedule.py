"""Evaluation schedules: which rounds are evaluated, and on which users (pure, no Ray).

A round is evaluated when round % train.eval_every == 0, round 0 only with train.eval_round0.
train.eval_users = None evaluates every user; a count or a fraction evaluates a fixed sample,
drawn once from train.eval_seed, the same users every round. With a sample, selection and early
stopping read the sample's validation metric; the server evaluates every user again at a round
that improves it (the selected round's valid and test in the summary are on every user) and at
the last round (docs/methods.md, "Evaluation schedules").
"""

from __future__ import annotations

import numpy as np

from pipeline.config import TrainConfig

_SAMPLE_STREAM = 0xE7A1  # the sample's own random stream, apart from every training draw


def evaluates(train: TrainConfig, round_: int) -> bool:
    """Whether round `round_` (0-based) is a scheduled evaluation."""
    return round_ % train.eval_every == 0 and (round_ > 0 or train.eval_round0)


def eval_user_count(train: TrainConfig, n_users: int) -> int | None:
    """How many users a scheduled evaluation covers; None = every user (no sample). Raises
    ValueError naming train.eval_users when a count exceeds the dataset's users."""
    spec = train.eval_users
    if spec is None:
        return None
    if isinstance(spec, float):
        count = max(1, int(round(spec * n_users)))
    else:
        count = spec
        if count > n_users:
            raise ValueError(f"train.eval_users={count} exceeds the dataset's {n_users} users: give a count "
                             f"<= {n_users}, a fraction in (0, 1], or null for every user")
    return None if count >= n_users else count


def eval_sample(train: TrainConfig, n_users: int) -> np.ndarray | None:
    """The sorted user ids of every scheduled evaluation (None = every user): the same for every
    round, run and train.seed; it depends on train.eval_seed, eval_users and n_users only."""
    count = eval_user_count(train, n_users)
    if count is None:
        return None
    rng = np.random.default_rng([train.eval_seed, _SAMPLE_STREAM])
    return np.sort(rng.choice(n_users, size=count, replace=False)).astype(np.int64)
