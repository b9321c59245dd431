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


def replay(history: list[dict], protocol: str, metric: str, patience: int, rounds: int, users: int) -> dict:
    """What a run under `protocol` (one of train.also_protocols) would report, from a history
    whose evaluated rounds hold its `<protocol>/valid/<m>` and `<protocol>/test/<m>`: the same
    selection rule on `metric` and the same patience, stopping where that run would stop. Its
    training is the same (evaluation changes no state), so this is that run's report exactly when
    `complete`: every evaluated round of the history holds that protocol's metrics (not so for the
    rounds of a run resumed with also_protocols added), and the history went on at least as long
    as that run would have (it ran `rounds`, train.rounds, or that run's patience ran out within
    it)."""
    prefix = f"{protocol}/"
    selection, played, last, missing = Selection(metric, patience), 0, None, False
    for row in history:
        played += 1
        evaluated = any(key.startswith("valid/") for key in row)
        missing |= evaluated and f"{prefix}valid/{metric}" not in row  # a round evaluated without it
        if f"{prefix}valid/{metric}" in row:
            last = row
            selection.update(row["round"], {k[len(prefix):]: v for k, v in row.items() if k.startswith(prefix)})
            if selection.should_stop():
                break
    pick = lambda split: {k[len(prefix) + len(split) + 1:]: v for k, v in (last or {}).items()  # noqa: E731
                          if k.startswith(f"{prefix}{split}/")}
    final = None if last is None or last is not history[played - 1] else {
        "round": last["round"], "users": users, "valid": pick("valid"), "test": pick("test")}
    return {"selection": selection.report(), "rounds_run": played, "final": final,
            "complete": not missing and (selection.should_stop() or played >= rounds)}
