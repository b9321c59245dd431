"""Sweeps of an experiment config's hyper-parameters with Ray Tune: Optuna search (seeded) behind
a concurrency limit, ASHA early stopping on rounds, one report per round, TensorBoard files of
every trial under the storage path, resumable with Tuner.restore, the best config exported.

A search space is a YAML file next to the experiment configs (configs/sweeps/*.yaml):

    base: configs/synthetic/fcf_fedmr.yaml      # the experiment config the trials start from
    set: [train.rounds=10]                      # fixed overrides (optional)
    metric: valid/hr@50                         # optional: must be valid/<the config's selection metric>
    pools: 1                                    # ClientPools per trial (each 1 CPU), reserved with it
    params:                                     # dotted config keys -> one distribution each
      train.lr: {loguniform: [0.01, 1.0]}
      model.fusion.d_f: {choice: [16, 32, 64]}
      model.fusion.dropout: {uniform: [0.0, 0.3]}
    start:                                      # points tried first, e.g. known recipes (optional)
      - {train.lr: 0.1, model.fusion.d_f: 32, model.fusion.dropout: 0.0}

Distributions: choice [values], uniform [low, high], loguniform [low, high], randint [low, high).
A space is checked whole when it loads, before Ray starts: every choice, both bounds of every
uniform, loguniform and randint (low below high, a loguniform above 0) and every start point must
make a valid config, or the sweep stops at once naming the file and the key. So must every
combination of those values (a point where two keys are valid alone but not together, e.g. the
selection metric's K and train.eval_ks), up to POINTS_CHECKED combinations. Before Ray starts, the
sweep also opens the data of every such point and start point and checks it against what the
point's fusion module reads (its feature store: finite, complete, and present where a modality
needs it), naming the point that fails.
Each trial runs the federated job (pipeline.federated.runtime.run.train) in a placement group holding
its driver and its pools; its run directory (metrics.jsonl, tb/, checkpoints/) is the trial's
`run/` folder, so `tensorboard --logdir <storage>/<name>` shows every trial, once: Ray Tune's own
TensorBoard logger is left out (its copies of the same numbers under ray/tune/ tags), and the sweep
adds each trial's HParams session to its run (tune/hparams.py).

Trials are compared by `pipeline train`'s own selection rule (tune/trials.py): the validation metric
at the round train selects for the trial. Every round a trial reports that score so far (the
`best/valid/<m>` key), which is what ASHA and Optuna see; the sweep then ranks the trials from their
folders by the same rule, writes the table (trials.md, trials.csv) next to the sweep, and exports the
best trial's config (best.yaml) with a fresh run directory and the base config's schedule: the keys
of SCHEDULE_KEYS (and runtime.*) set in the space's `set:` to shorten the trials (train.rounds=10)
are the base config's again, unless keep_schedule (`--keep-sweep-schedule`). docs/sweeps.md is the
user's guide.
"""

from __future__ import annotations

import itertools
import json
import math
import shlex
from contextlib import contextmanager
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
        """Read a space and check it whole before anything runs: every distribution over its whole
        range (both bounds, every choice; a randint of up to RANDINT_CHECKED values at every value)
        and every start point must make a valid config. ValueError, naming the file and the key."""
        from pipeline.config import read_yaml

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: search space file not found")
        raw = read_yaml(path) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a search space must hold a mapping at top level")
        unknown = set(raw) - {"base", "set", "metric", "pools", "params", "start"}
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)} (expected base, set, metric, pools, params, "
                             f"start)")
        if "base" not in raw or not raw.get("params") or not isinstance(raw["params"], dict):
            raise ValueError(f"{path}: needs `base` (an experiment config) and a non-empty `params` mapping")
        for key, spec in raw["params"].items():
            _check_distribution(path, key, spec)
        pools = raw.get("pools", 1)
        if isinstance(pools, bool) or not isinstance(pools, int) or pools < 1:
            raise ValueError(f"{path}: pools: expected a whole number >= 1, got {pools!r}")
        start = raw.get("start") or []
        if not isinstance(start, list):
            raise ValueError(f"{path}: start: expected a list of points, got {start!r}")
        for number, point in enumerate(start, 1):
            if not isinstance(point, dict) or set(point) != set(raw["params"]):
                raise ValueError(f"{path}: start point {number} must give a value for every key of params "
                                 f"({sorted(raw['params'])}), got {point!r}")
        space = SearchSpace(base=raw["base"], params=raw["params"], overrides=list(raw.get("set") or []),
                            metric=raw.get("metric"), pools=pools, start=list(start))
        try:
            space.config({})  # the base and the fixed overrides
        except ValueError as error:
            raise ValueError(f"{path}: base {space.base} with set {space.overrides}: {error}") from None
        for key, spec in space.params.items():  # every value each distribution can draw
            for value in _values_to_check(spec):
                try:
                    space.config({key: value})
                except ValueError as error:
                    reason = str(error).removeprefix(f"--set {key}={json.dumps(value)}: ")
                    raise ValueError(f"{path}: params.{key}: {_describe(spec)} can draw {value!r}, which the "
                                     f"config refuses: {reason}") from None
        try:
            space.config(space.example())
        except ValueError as error:
            raise ValueError(f"{path}: the first value of every distribution together: {error}") from None
        selected = space.selection_metric()
        for point in space.points(start=False):  # the values checked above, in every combination
            try:
                config = space.config(point)
            except ValueError as error:
                raise ValueError(f"{path}: the point {_point_text(point)}: {error}") from None
            _check_selection_metric(path, f"the point {_point_text(point)}", config, selected)
        for number, point in enumerate(space.start, 1):
            try:
                config = space.config(point)
            except ValueError as error:
                raise ValueError(f"{path}: start point {number}: {error}") from None
            _check_selection_metric(path, f"start point {number}", config, selected)
        if space.metric is not None and space.metric != selected:
            raise ValueError(f"{path}: metric: {space.metric}, but the trials' training selects on {selected} "
                             f"(train.selection_metric, else hr@10 under P1 and hr@50 under P3); trials are ranked "
                             f"by the metric train selects on: set train.selection_metric="
                             f"{space.metric.removeprefix('valid/')} in `set:`, or leave `metric` out")
        return space

    def selection_metric(self) -> str:
        """'valid/<m>': the validation metric `pipeline train` selects on at every point of the space
        (checked the same at every point when the space loads), which the sweep ranks by."""
        return f"valid/{self.config(self.example()).train.selection()}"

    def best_config(self, point: dict, out: str | Path, keep_schedule: bool = False):
        """The config to train a point with on its own: the base config, the space's `set:` (less its
        SCHEDULE_KEYS unless keep_schedule: the base config's schedule, not the trials' shortened
        one), the point, and runtime.out=out; not the trials' pool layout (runtime.pools)."""
        from pipeline.config import load_config

        kept = self.overrides if keep_schedule else [o for o in self.overrides if not _schedule_key(o)]
        return load_config(self.base, [*kept, *(f"{k}={json.dumps(v)}" for k, v in point.items()),
                                       f"runtime.out={json.dumps(str(out))}"])

    def dropped_schedule(self) -> list[str]:
        """The space's `set:` overrides that shorten the trials and are left out of the exported config."""
        return [o for o in self.overrides if _schedule_key(o)]

    def config(self, point: dict, extra: list[str] = ()):
        """The ExperimentConfig of one point of the space (refused by name if a key is wrong)."""
        from pipeline.config import load_config

        # a JSON value is a YAML value: strings quoted, booleans true/false, numbers as they are
        return load_config(self.base, [*self.overrides, *extra, *(f"{k}={json.dumps(v)}" for k, v in point.items()),
                                       f"runtime.pools={self.pools}", "runtime.cpus_per_pool=1"])

    def points(self, start: bool = True) -> list[dict]:
        """The points checked before a sweep runs: every combination of every distribution's checked
        values (each choice, both bounds of a uniform, loguniform or randint) when there are at most
        POINTS_CHECKED; else every combination of the keys that change what a trial reads (data.*,
        model.fusion*), the other keys at their first value, and each key's values alone. Then the
        start points (start=True)."""
        values = {key: _corner_values(spec) for key, spec in self.params.items()}
        alone = []
        if math.prod(map(len, values.values())) > POINTS_CHECKED:
            first = self.example()
            alone = [{**first, key: value} for key, options in values.items() for value in options]
            values = {key: options if _reads_data(key) else [first[key]] for key, options in values.items()}
            while math.prod(map(len, values.values())) > POINTS_CHECKED:  # still too many: the largest at its ends
                widest = max(values, key=lambda key: len(values[key]))
                values[widest] = [values[widest][0], values[widest][-1]]
        keys = list(values)
        combos = [dict(zip(keys, combo)) for combo in itertools.product(*(values[key] for key in keys))]
        return combos + alone + (list(self.start) if start else [])

    def example(self) -> dict:
        """One point of the space: the first argument of every distribution."""
        return {key: next(iter(spec.values()))[0] for key, spec in self.params.items()}

    def tune_space(self) -> dict:
        from ray import tune

        make = {"choice": lambda a: tune.choice(list(a)), "uniform": lambda a: tune.uniform(*a),
                "loguniform": lambda a: tune.loguniform(*a), "randint": lambda a: tune.randint(*a)}
        return {key: make[name](args) for key, spec in self.params.items() for name, args in spec.items()}


# `set:` keys that say how long and how closely the trials run rather than what they train: the
# exported best config takes them from the base config (every runtime.* key too: the trials' pools,
# checkpoints and output folder are the sweep's, not the final run's)
SCHEDULE_KEYS = ("train.rounds", "train.patience", "train.eval_every", "train.eval_round0", "train.eval_users")


def _schedule_key(override: str) -> bool:
    key = override.split("=", 1)[0].strip()
    return key in SCHEDULE_KEYS or key == "runtime" or key.startswith("runtime.")


RANDINT_CHECKED = 256  # a randint over at most this many values is checked at each of them, else at its bounds
POINTS_CHECKED = 4096  # combinations of the distributions' checked values tried together (about 2 ms each)


def _corner_values(spec: dict) -> list:
    """A distribution's values tried in combination with the other keys': every choice, the bounds of a range."""
    name, args = next(iter(spec.items()))
    if name == "choice":
        return list(args)
    return [args[0], args[1] - 1] if name == "randint" else list(args)


def _reads_data(key: str) -> bool:
    """Whether a dotted key changes the data a trial opens or the features its fusion module reads."""
    return key in ("data", "model") or key.startswith(("data.", "model.fusion"))


def _point_text(point: dict) -> str:
    return "{" + ", ".join(f"{key}: {json.dumps(value)}" for key, value in point.items()) + "}"


def check_points_data(space: SearchSpace, space_path, data_cache) -> int:
    """Open the data of every point of space.points() and check it against the point's fusion module
    (pipeline.federated.runtime.run.open_checked: the feature store finite and complete, and present where the
    module reads it), once per distinct data and modalities; ValueError naming the file, and the point
    where the points differ in what they read. Returns how many distinct (data, modalities) were checked."""
    from pipeline.federated.runtime.run import open_checked

    checked: dict[tuple, dict] = {}
    for point in space.points():
        config = space.config(point)
        fusion = config.model.fusion
        key = (config.data.model_dump_json(), None if fusion is None else tuple(fusion.modalities),
               config.train.eval_users)  # open_checked also checks train.eval_users against the data
        if key not in checked:
            checked[key] = {k: v for k, v in point.items() if _reads_data(k)}
            try:
                open_checked(config, data_cache)
            except ValueError as error:
                where = f" the point {_point_text(checked[key])}:" if checked[key] else ""
                raise ValueError(f"{space_path}:{where} {error}") from None
    return len(checked)


def _check_selection_metric(path: Path, where: str, config, selected: str) -> None:
    """Trials are ranked by the validation metric `pipeline train` selects on, so it must be the same
    at every point (else trials would be compared on different metrics). ValueError naming the point."""
    other = f"valid/{config.train.selection()}"
    if other != selected:
        raise ValueError(f"{path}: {where} selects on {other}, the first value of every distribution on "
                         f"{selected}: trials are ranked by the metric their training selects on, so it must be the "
                         f"same at every point (fix train.selection_metric in `set:`)")


def _describe(spec: dict) -> str:
    name, args = next(iter(spec.items()))
    return f"{{{name}: {json.dumps(args)}}}"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_distribution(path: Path, key: str, spec) -> None:
    """ValueError naming the file and key unless `spec` is one well-formed distribution."""
    where = f"{path}: params.{key}"
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ValueError(f"{where}: one of {', '.join(DISTRIBUTIONS)} with its arguments, e.g. "
                         f"{{uniform: [0.0, 0.3]}}, got {spec!r}")
    name, args = next(iter(spec.items()))
    if name == "choice":
        if not isinstance(args, list) or not args:
            raise ValueError(f"{where}: choice needs a non-empty list of values, got {args!r}")
        return
    if not isinstance(args, list) or len(args) != 2:
        raise ValueError(f"{where}: {name} needs [low, high], got {args!r}")
    low, high = args
    if name == "randint":
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in args):
            raise ValueError(f"{where}: randint needs two whole numbers [low, high) (high excluded), got {args!r}")
        if not low < high:
            raise ValueError(f"{where}: randint [{low}, {high}) is empty: low must be below high (high is excluded)")
        return
    if not all(_number(v) for v in args):
        raise ValueError(f"{where}: {name} needs two finite numbers [low, high], got {args!r}")
    if not low < high:
        raise ValueError(f"{where}: {name} [{low}, {high}]: low must be below high")
    if name == "loguniform" and not low > 0:
        raise ValueError(f"{where}: loguniform [{low}, {high}]: low must be above 0 (a log scale)")


def _values_to_check(spec: dict) -> list:
    """Every value of a choice, both bounds of a uniform or loguniform (the config's number ranges are
    intervals, so a range valid at both ends is valid inside), every value of a small randint."""
    name, args = next(iter(spec.items()))
    if name == "choice":
        return list(args)
    if name == "randint":
        low, high = args
        return list(range(low, high)) if high - low <= RANDINT_CHECKED else [low, high - 1]
    return list(args)


def _trial(point: dict, space: SearchSpace, cwd: str, data_cache: str | None = None) -> None:
    """One trial: the federated job of this point, reporting every round to Tune with its score so
    far by train's selection rule (SCORE_PREFIX + the validation metric; absent until a round is
    evaluated)."""
    import os

    from ray import tune

    from pipeline.federated.runtime.run import train
    from tune.trials import read_rows, selection_of

    os.chdir(cwd)  # Tune starts a trial in its own folder; configs and caches are relative to the project
    trial_dir = Path(tune.get_context().get_trial_dir())
    config = space.config(point, [f"runtime.out={trial_dir / 'run'}", "runtime.progress=false"])
    checkpoints = trial_dir / "run" / "checkpoints"
    resume = checkpoints.is_dir() and any(checkpoints.glob("round-*/manifest.json"))
    metric = space.selection_metric()

    def report(metrics: dict) -> None:
        # the rows so far, those a resume restored included (the round is in metrics.jsonl by now)
        selection = selection_of(read_rows(trial_dir / "run" / "metrics.jsonl"), metric)
        score = {} if selection is None else {SCORE_PREFIX + metric: selection["valid"][metric[6:]],
                                              "best/round": selection["best_round"]}
        tune.report({**{k: v for k, v in metrics.items() if isinstance(v, (int, float))}, **score})

    train(config, resume=resume, quiet=True, data_cache=data_cache, on_round=report)


SCORE_PREFIX = "best/"  # Tune's metric: best/valid/<m>, a trial's validation metric at train's selected round so far


def _fresh_run_dir(sweep_dir: Path) -> Path:
    """Where the best config trains: <sweep>/best_run, or best_run_2, 3, ... when that already
    holds something (a best command run before a resumed sweep). Never a trial's folder, never the
    base config's runtime.out."""
    for number in itertools.count(1):
        candidate = sweep_dir / ("best_run" if number == 1 else f"best_run_{number}")
        if not candidate.exists() or not any(candidate.iterdir()):
            return candidate


@contextmanager
def _without_tune_tensorboard():
    """Ray Tune adds its TensorBoard logger (every reported number again, under ray/tune/ tags, one
    step later) unless TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1 (ray/tune/utils/callback.py); set only
    while the sweep runs. Its CSV and JSON loggers (progress.csv, result.json, params.json: what the
    results and --resume read) are passed explicitly instead."""
    import os

    previous = os.environ.get("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS")
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", None)
        else:
            os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = previous


@dataclass
class SweepResult:
    rows: list[dict]          # tune.trials.trial_rows: every trial, ranked
    metric: str               # valid/<m>, what the trials are ranked by
    best: dict                # the best row
    export: Path              # the best config
    run_dir: Path             # where it trains: fresh, its own
    command: str              # the command that trains it, to run as printed
    table: Path               # trials.md
    table_csv: Path           # trials.csv
    dropped: list[str]        # the space's schedule overrides left out of the export
    path: Path                # the sweep's folder


def run_sweep(space_path: str | Path, *, samples: int, concurrency: int, storage: str | Path, name: str,
              seed: int = 0, grace_rounds: int = 2, resume: bool = False, export: str | Path | None = None,
              keep_schedule: bool = False) -> SweepResult:
    """Run (or, with resume, continue) the sweep; rank its trials, write the table and the HParams
    data, export the best config."""
    import os

    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from pipeline.data.cache import data_cache_root
    from pipeline.federated.runtime.run import ensure_ray
    from tune.hparams import write_hparams
    from tune.trials import trial_rows, write_tables

    space = SearchSpace.load(space_path)
    base = space.config(space.example())
    data_cache = data_cache_root()
    check_points_data(space, space_path, data_cache)  # every point's data and features, before Ray
    metric = space.selection_metric()
    score = SCORE_PREFIX + metric
    storage = Path(storage).resolve()
    ensure_ray()
    trainable = tune.with_resources(tune.with_parameters(_trial, space=space, cwd=os.getcwd(),
                                                                 data_cache=str(data_cache)),
                                    tune.PlacementGroupFactory([{"CPU": 1}] + [{"CPU": 1}] * space.pools))
    path = storage / name
    if resume:
        if not tune.Tuner.can_restore(str(path)):
            raise FileNotFoundError(f"{path}: no sweep to resume there")
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
    else:
        if path.exists():
            raise FileExistsError(f"{path} already holds a sweep: pass --resume to continue it, or another --name")
        optuna = OptunaSearch(metric=score, mode="max", seed=seed, points_to_evaluate=space.start or None)
        searcher = ConcurrencyLimiter(optuna, max_concurrent=concurrency)
        scheduler = ASHAScheduler(time_attr="round", metric=score, mode="max", max_t=base.train.rounds,
                                  grace_period=min(grace_rounds, base.train.rounds))
        tuner = tune.Tuner(trainable, param_space=space.tune_space(),
                           tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=samples),
                           run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0,
                                                     callbacks=[CSVLoggerCallback(), JsonLoggerCallback()]))
    with _without_tune_tensorboard():
        tuner.fit()

    rows = trial_rows(path, metric)
    write_hparams(rows, space.params, metric)
    md, table_csv = write_tables(path, rows, metric, f"Sweep {name}: {space_path}",
                                 f"python -m tune.trials {path} --space {space_path}", starts=space.start)
    ranked = [row for row in rows if row["rank"] is not None]
    if not ranked:
        raise RuntimeError(f"{path}: no trial ended with an evaluated round and without error, so there is no best "
                           f"config; the trials are in {md}")
    best = ranked[0]
    point = {key: best["params"][key] for key in space.params}
    run_dir = _fresh_run_dir(path)
    config = space.best_config(point, run_dir, keep_schedule)
    export = Path(export) if export else path / "best.yaml"
    command = f"python -m pipeline train --config {shlex.quote(str(export))}"
    dropped = [] if keep_schedule else space.dropped_schedule()
    schedule = (f"# schedule: the base config's (train.rounds={config.train.rounds}); the trials ran with "
                f"{', '.join(dropped)} (--keep-sweep-schedule keeps that)\n") if dropped else ""
    from pipeline.data.store import write_text_atomically

    write_text_atomically(export, (
        f"# best of sweep {name} ({len(rows)} trials, table: {md}): trial {best['trial']}\n"
        f"# ranked by {metric} at the round `pipeline train` selects: {best['valid']:.6g} at round "
        f"{best['best_round']} of {best['rounds']} run ({best['status']})\n"
        f"# point: {json.dumps(point)}\n{schedule}"
        f"# run it: {command}   (trains into {run_dir}, a fresh folder of its own)\n"
        + yaml.safe_dump(json.loads(config.model_dump_json()), sort_keys=False)))
    return SweepResult(rows=rows, metric=metric, best=best, export=export, run_dir=run_dir, command=command,
                       table=md, table_csv=table_csv, dropped=dropped, path=path)
