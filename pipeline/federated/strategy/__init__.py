"""The round policy of one experiment, apart from whatever runs the clients (no Ray here).

A Strategy owns the server's state (the global parameters, FedMR's server Adam, GFMFR's groups,
model selection, the history of rounds) and answers the steps of a round:

  configure(t)          who trains in round t, with which learning rates, global parameters and
                        GFMFR teacher: a RoundPlan that the pools (backend.Pools) train from
  aggregate(t, plan, u) the pools' uploads -> the new global parameters, and the round's
                        training metrics
  group_step(...)       GFMFR: group the round's clients and fit the group fusion model
  evaluates(t)          whether round t is a scheduled evaluation (and on which users)
  reduce(results)       the pools' evaluation results -> one mean per metric
  select(t, m, full)    model selection on validation; stop() says when the run is over
  state_dict / load     everything a checkpoint restores

rounds.run_rounds plays rounds of a Strategy against any backend.Pools.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import ExperimentConfig
from pipeline.federated.strategy.aggregate import aggregate, initial_state, round_lrs, round_users, shard_users
from pipeline.federated.privacy import privacy_report
from pipeline.federated.strategy.schedule import eval_sample, evaluates
from pipeline.federated.strategy.selection import Selection, replay


@dataclass
class RoundPlan:
    """What a round's pools train from."""

    round: int
    split: object  # arrivals.Arrivals: the sampled users, arrived, dropped and late
    lrs: dict[str, float]  # parameter -> learning rate of this round
    globals: dict[str, torch.Tensor]  # the global parameters every client downloads
    teacher: object | None  # GFMFR's TeacherDownload (None: no distillation this round)

    @property
    def users(self) -> np.ndarray:
        """The sorted users that train this round (the arrived ones)."""
        return self.split.arrived


def _nbytes(tensors: dict) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors.values()))


class Strategy:
    def __init__(self, config: ExperimentConfig, data, *, n_pools: int = 1, dtype: torch.dtype | None = None):
        """data: the PreparedDataset (its sizes, train counts and item features are read).
        n_pools: how many pools hold the users (shards: contiguous ranges of about equal rows).
        dtype: the global parameters' dtype (None: as initialised, float32)."""
        from pipeline.federated.strategy.aggregate import feature_dims

        self.config, self.dtype = config, dtype
        self.n_users, self.n_items = data.n_users, data.n_items
        self.train_counts = np.asarray(data.train_counts)
        self.features = {m: torch.as_tensor(np.asarray(x)) for m, x in data.features.items()}
        self.initial = initial_state(config, self.n_users, self.n_items, feature_dims(data))
        self.shards = shard_users(self.train_counts, n_pools)
        # train.eval_users: the fixed sample of every scheduled evaluation, per pool (None: every user)
        sample = eval_sample(config.train, self.n_users)
        self.eval_users = self.n_users if sample is None else len(sample)
        self.sample_per_pool = None if sample is None else [shard[np.isin(shard, sample)] for shard in self.shards]
        self.recoveries = 0  # rounds redone from a checkpoint after a pool was lost
        self.reset()

    def reset(self) -> None:
        """Back to the initial state, before round 0."""
        self.globals = {k: v if self.dtype is None else v.to(self.dtype) for k, v in self.initial.global_params.items()}
        self.fusion_adam = None  # fusion_agg=grad_adam: the server's persistent Adam state
        self.groups = self._new_groups()  # GFMFR's server state (None when off)
        self.selection = Selection(self.config.train.selection(), self.config.train.patience)
        self.history: list[dict] = []

    def _new_groups(self):
        if self.config.model.gfmfr is None:
            return None
        from pipeline.federated.strategy.group_server import GroupServer
        from pipeline.models import model_for

        return GroupServer(self.config, model_for(self.config.model), self.initial, self.features, self.n_users,
                           self.n_items, **({} if self.dtype is None else {"dtype": self.dtype}))

    @property
    def next_round(self) -> int:
        return len(self.history)

    # -- a round's steps --------------------------------------------------------------------

    def configure(self, round_: int) -> RoundPlan:
        split = round_users(self.config, self.train_counts, round_)
        teacher = self.groups.download(round_) if self.groups is not None else None
        return RoundPlan(round_, split, round_lrs(self.config, self.n_items, round_), self.globals, teacher)

    def users_per_pool(self, users: np.ndarray) -> list[np.ndarray]:
        return [users[np.isin(users, shard)] for shard in self.shards]

    def aggregate(self, plan: RoundPlan, uploads: list) -> dict:
        """The new global parameters from the pools' uploads (one per pool); the round's training
        metrics."""
        round_ = plan.round
        self.globals, self.fusion_adam = aggregate(self.config, plan.globals, uploads, self.fusion_adam, round_)
        clients = sum(u.clients for u in uploads)
        metrics = {
            "round": round_,
            "train/loss": sum(u.loss_sum for u in uploads) / max(clients, 1),
            "train/clients": clients,
            "train/rows": sum(u.rows for u in uploads),
            "train/sampled": plan.split.sampled,
            "train/dropped": len(plan.split.dropped),
            "train/stragglers": len(plan.split.late),
            "time/pool_seconds_max": max(u.seconds for u in uploads),
            "comm/bytes_down": _nbytes(self.globals) * len(uploads),
            "comm/bytes_up": sum(u.nbytes() for u in uploads),
            "lr": self.config.lr() * self.config.lr_decay() ** round_,
        }
        if self.config.privacy is not None:
            report = privacy_report(self.config.privacy, self.config.train.participation, round_ + 1)
            metrics.update({"privacy/epsilon": report["epsilon"], "privacy/delta": report["delta"],
                            "privacy/clipped_fraction": sum(u.clipped for u in uploads) / max(clients, 1)})
        return metrics

    def group_step(self, plan: RoundPlan, uploads: list, group_sums) -> dict:
        """GFMFR's server step after aggregation (group_server.GroupServer.step). group_sums(ids) ->
        each pool's (sums, members) of its clients' table changes per group, where their state lives."""
        return self.groups.step(plan.round, uploads, group_sums, plan.globals, self.globals)

    @property
    def n_groups(self) -> int:
        return self.config.model.gfmfr.group_num

    def evaluates(self, round_: int) -> bool:
        return evaluates(self.config.train, round_)

    @staticmethod
    def reduce(results: list[tuple[dict, int]]) -> dict[str, float]:
        """The pools' (mean metrics, users) -> means over every user they scored; catalogue
        coverage@k from the union of the pools' covered@k items (a mean of the pools' own
        coverages would be wrong)."""
        results = [(m, count) for m, count in results if count]
        total = sum(count for _, count in results)
        names = [n for n in results[0][0] if not n.startswith(("covered@", "coverage@"))]
        out = {name: sum(m[name] * count for m, count in results) / total for name in names}
        for name in (n for n in results[0][0] if n.startswith("covered@")):
            union = np.logical_or.reduce([m[name] for m, _ in results])
            out[f"coverage@{name.partition('@')[2]}"] = float(union.mean())
        return out

    def improves(self, metrics: dict) -> bool:
        return self.selection.improves(metrics)

    def select(self, round_: int, metrics: dict, full: dict | None) -> bool:
        """Feed an evaluated round to model selection (validation only); True if it is the new best."""
        return self.selection.update(round_, metrics, full)

    def stops(self, round_: int) -> bool:
        """Whether the run ends after round `round_` (patience exhausted or train.rounds reached)."""
        return self.selection.should_stop() or round_ + 1 >= self.config.train.rounds

    def finish(self, metrics: dict) -> None:
        """Record a played round."""
        self.history.append(metrics)

    def finished(self) -> bool:
        """Whether the history's last round ended the run (a resume that raises train.rounds
        continues a run that only reached its rounds)."""
        if not self.history:
            return False
        return self.selection.should_stop() or len(self.history) >= self.config.train.rounds

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"globals": self.globals, "selection": self.selection.state_dict(), "history": self.history,
                "fusion_adam": self.fusion_adam,
                "groups": self.groups.state_dict() if self.groups is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.globals, self.history = state["globals"], state["history"]
        self.fusion_adam = state.get("fusion_adam")
        self.groups = self._new_groups()
        if self.groups is not None:
            self.groups.load_state_dict(state["groups"])
        self.selection.load_state_dict(state["selection"])
        self.selection.patience = self.config.train.patience  # a resume may change the patience

    # -- reporting ----------------------------------------------------------------------------

    def summary(self) -> dict:
        """Selection, the evaluation schedule and the final state's evaluation, rounds run, privacy."""
        privacy = self.config.privacy
        if privacy is not None:
            privacy = privacy_report(privacy, self.config.train.participation, len(self.history))
        train = self.config.train
        evaluation = {"every": train.eval_every, "round0": train.eval_round0, "users": self.eval_users,
                      "sampled": self.sample_per_pool is not None, "seed": train.eval_seed, "final": self._final()}
        also = {protocol: replay(self.history, protocol, train.selection(protocol), train.patience, train.rounds,
                                  self.n_users)
                for protocol in train.also_protocols}
        return {"selection": self.selection.report(), "evaluation": evaluation, "rounds_run": len(self.history),
                "privacy": privacy, **({"also": also} if also else {})}

    def _final(self) -> dict | None:
        """The last round's state on every user: its full/ evaluation under a sample, else its
        scheduled evaluation when the last round had one (None otherwise)."""
        if not self.history:
            return None
        last = self.history[-1]
        prefix = "full/" if "full/users" in last else ""
        if f"{prefix}valid/{self.selection.metric}" not in last or (not prefix and last.get("eval/sampled")):
            return None
        pick = lambda split: {k[len(prefix) + len(split) + 1:]: v for k, v in last.items()  # noqa: E731
                              if k.startswith(f"{prefix}{split}/")}
        return {"round": last["round"], "users": self.n_users, "valid": pick("valid"), "test": pick("test")}
