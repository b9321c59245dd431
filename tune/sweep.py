"""Sweeps of an experiment config's hyper-parameters with Ray Tune: Optuna search (seeded) behind
a concurrency limit, ASHA early stopping on rounds, one report per round, TensorBoard files of
every trial under the storage path, resumable with Tuner.restore, the best config exported.

A search space is a YAML file next to the experiment configs (configs/sweeps/*.yaml):

    base: configs/synthetic/fcf_fedmr.yaml      # the experiment config the trials start from
    set: [train.rounds=10]                      # fixed overrides (optional)
    metric: valid/hr@50                         # what to maximise (default: the config's selection)
    pools: 1                                    # ClientPools per trial (each 1 CPU), reserved with it
    params:                                     # dotted config keys -> one distribution each
      train.lr: {loguniform: [0.01, 1.0]}
      model.fusion.d_f: {choice: [16, 32, 64]}
      model.fusion.dropout: {uniform: [0.0, 0.3]}
    start:                                      # points tried first, e.g. known recipes (optional)
      - {train.lr: 0.1, model.fusion.d_f: 32, model.fusion.dropout: 0.0}

Distributions: choice [values], uniform [low, high], loguniform [low, high], randint [low, high).
Each trial runs the federated job (pipeline.federated.run.train) in a placement group holding
its driver and its pools; its run directory (metrics.jsonl, tb/, checkpoints/) is the trial's
`run/` folder, so `tensorboard --logdir <storage>/<name>` shows every trial.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")


@dataclass
class SearchSpace:
    base: str
    params: dict[str, dict]
    overrides: list[str] = field(default_factory=list)
    metric: str | None = None
    pools: int = 1
    start: list[dict] = field(default_factory=list)

    @staticmethod
    def load(path: str | Path) -> "SearchSpace":
        path = Path(path)
        raw = yaml.safe_load(path.read_text()) or {}
        unknown = set(raw) - {"base", "set", "metric", "pools", "params", "start"}
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)} (expected base, set, metric, pools, params, "
                             f"start)")
        if "base" not in raw or not raw.get("params"):
            raise ValueError(f"{path}: needs `base` (an experiment config) and a non-empty `params`")
        for key, spec in raw["params"].items():
            if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
                raise ValueError(f"{path}: params.{key}: one of {DISTRIBUTIONS} with its arguments, got {spec!r}")
        start = raw.get("start") or []
        for number, point in enumerate(start, 1):
            if not isinstance(point, dict) or set(point) != set(raw["params"]):
                raise ValueError(f"{path}: start point {number} must give a value for every key of params "
                                 f"({sorted(raw['params'])}), got {point!r}")
        space = SearchSpace(base=raw["base"], params=raw["params"], overrides=list(raw.get("set") or []),
                            metric=raw.get("metric"), pools=int(raw.get("pools", 1)), start=list(start))
        examples = space.example()
        space.config(examples)  # every key must exist
        for key, spec in space.params.items():  # and every choice must make a valid config
            for value in spec.get("choice", ())[1:]:
                space.config({**examples, key: value})
        for point in space.start:
            space.config(point)
        return space

    def config(self, point: dict, extra: list[str] = ()):
        """The ExperimentConfig of one point of the space (refused by name if a key is wrong)."""
        from pipeline.config import load_config

        # a JSON value is a YAML value: strings quoted, booleans true/false, numbers as they are
        return load_config(self.base, [*self.overrides, *extra, *(f"{k}={json.dumps(v)}" for k, v in point.items()),
                                       f"runtime.pools={self.pools}", "runtime.cpus_per_pool=1"])

    def example(self) -> dict:
        """One point of the space: the first argument of every distribution."""
        return {key: next(iter(spec.values()))[0] for key, spec in self.params.items()}

    def tune_space(self) -> dict:
        from ray import tune

        make = {"choice": lambda a: tune.choice(list(a)), "uniform": lambda a: tune.uniform(*a),
                "loguniform": lambda a: tune.loguniform(*a), "randint": lambda a: tune.randint(*a)}
        return {key: make[name](args) for key, spec in self.params.items() for name, args in spec.items()}


def _trial(point: dict, space: SearchSpace, cwd: str) -> None:
    """One trial: the federated job of this point, reporting every round to Tune."""
    import os

    from ray import tune

    from pipeline.federated.run import train

    os.chdir(cwd)  # Tune starts a trial in its own folder; configs and caches are relative to the project
    trial_dir = Path(tune.get_context().get_trial_dir())
    config = space.config(point, [f"runtime.out={trial_dir / 'run'}", "runtime.progress=false"])
    checkpoints = trial_dir / "run" / "checkpoints"
    resume = checkpoints.is_dir() and any(checkpoints.glob("round-*/manifest.json"))
    train(config, resume=resume, quiet=True,
          on_round=lambda m: tune.report({k: v for k, v in m.items() if isinstance(v, (int, float))}))


def run_sweep(space_path: str | Path, *, samples: int, concurrency: int, storage: str | Path, name: str,
              seed: int = 0, grace_rounds: int = 2, resume: bool = False, export: str | Path | None = None):
    """Run (or, with resume, continue) the sweep; returns (ResultGrid, best point, best config path)."""
    import os

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from pipeline.federated.run import ensure_ray

    space = SearchSpace.load(space_path)
    base = space.config(space.example())
    metric = space.metric or f"valid/{base.train.selection()}"
    storage = Path(storage).resolve()
    ensure_ray()
    trainable = tune.with_resources(tune.with_parameters(_trial, space=space, cwd=os.getcwd()),
                                    tune.PlacementGroupFactory([{"CPU": 1}] + [{"CPU": 1}] * space.pools))
    path = storage / name
    if resume:
        if not tune.Tuner.can_restore(str(path)):
            raise FileNotFoundError(f"{path}: no sweep to resume there")
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
    else:
        if path.exists():
            raise FileExistsError(f"{path} already holds a sweep: pass --resume to continue it, or another --name")
        optuna = OptunaSearch(metric=metric, mode="max", seed=seed, points_to_evaluate=space.start or None)
        searcher = ConcurrencyLimiter(optuna, max_concurrent=concurrency)
        scheduler = ASHAScheduler(time_attr="round", metric=metric, mode="max", max_t=base.train.rounds,
                                  grace_period=min(grace_rounds, base.train.rounds))
        tuner = tune.Tuner(trainable, param_space=space.tune_space(),
                           tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=samples),
                           run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0))
    results = tuner.fit()
    best = results.get_best_result(metric=metric, mode="max", scope="all")
    point = {key: best.config[key] for key in space.params}
    config = space.config(point)
    export = Path(export) if export else path / "best.yaml"
    export.parent.mkdir(parents=True, exist_ok=True)
    dumped = json.loads(config.model_dump_json())
    export.write_text(f"# best of sweep {name} by {metric} (max over rounds): {best.metrics_dataframe[metric].max()}\n"
                      f"# point: {json.dumps(point)}\n" + yaml.safe_dump(dumped, sort_keys=False))
    return results, point, export
