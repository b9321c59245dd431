"""Model selection on validation only, early stopping, and the test report at the best round.
A round improves only if strictly better than the best so far.

With a sampled evaluation (train.eval_users) the rounds are compared on the sample's validation
metric, and the caller passes the improving round's evaluation on every user as `full`: the
report's valid and test are then on every user, and `selected_on` holds the sample's numbers."""

from __future__ import annotations

import math


class Selection:
    def __init__(self, metric: str, patience: int):
        self.metric, self.patience = metric, patience
        self.best_round: int | None = None
        self.best_value = -math.inf
        self.best_valid: dict[str, float] = {}
        self.best_test: dict[str, float] = {}
        self.bad = 0
        self.best_sampled: dict | None = None  # the sample's validation metrics at the best round

    def improves(self, metrics: dict) -> bool:
        """Whether this evaluated round would be the new best (update() not yet called)."""
        return metrics[f"valid/{self.metric}"] > self.best_value

    def update(self, round_: int, metrics: dict, full: dict | None = None) -> bool:
        """Feed one evaluated round ('valid/<m>' and 'test/<m>' keys); True if it is the new best.
        full: the same round evaluated on every user when `metrics` is a sample's (its
        'eval/users' the sample size); the best round's valid and test are then taken from it."""
        value = metrics[f"valid/{self.metric}"]
        if value > self.best_value:
            self.best_round, self.best_value, self.bad = round_, value, 0
            source = metrics if full is None else full
            self.best_valid = {k[6:]: v for k, v in source.items() if k.startswith("valid/")}
            self.best_test = {k[5:]: v for k, v in source.items() if k.startswith("test/")}
            self.best_sampled = None if full is None else {
                "users": metrics["eval/users"], "valid": {k[6:]: v for k, v in metrics.items() if k.startswith("valid/")}}
            return True
        self.bad += 1
        return False

    def should_stop(self) -> bool:
        """Consecutive non-improving evaluations exceed the patience."""
        return self.bad > self.patience

    def report(self) -> dict:
        report = {"metric": f"valid/{self.metric}", "best_round": self.best_round, "valid": self.best_valid,
                  "test": self.best_test}
        if getattr(self, "best_sampled", None) is not None:  # selected on a sample; valid and test: every user
            report["selected_on"] = self.best_sampled
        return report

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)
