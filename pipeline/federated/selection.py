"""Model selection on validation only, early stopping, and the test report at the best round.
A round improves only if strictly better than the best so far."""

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

    def update(self, round_: int, metrics: dict) -> bool:
        """Feed one evaluated round ('valid/<m>' and 'test/<m>' keys); True if it is the new best."""
        value = metrics[f"valid/{self.metric}"]
        if value > self.best_value:
            self.best_round, self.best_value, self.bad = round_, value, 0
            self.best_valid = {k[6:]: v for k, v in metrics.items() if k.startswith("valid/")}
            self.best_test = {k[5:]: v for k, v in metrics.items() if k.startswith("test/")}
            return True
        self.bad += 1
        return False

    def should_stop(self) -> bool:
        """Consecutive non-improving evaluations exceed the patience."""
        return self.bad > self.patience

    def report(self) -> dict:
        return {"metric": f"valid/{self.metric}", "best_round": self.best_round, "valid": self.best_valid,
                "test": self.best_test}

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)
