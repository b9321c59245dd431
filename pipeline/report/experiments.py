"""Run a set of experiment configs over several seeds; collect each run's summary.json.

A seed s sets both train.seed (sampling, negatives, shuffling) and train.model_seed
(initialisation); the P1 evaluation negatives (data.eval_seed) stay fixed across seeds.

Run directory: <runs_dir>/<key>/seed-<s>, where key is the config's `name`, suffixed with
`-<protocol>` when the overrides change the protocol from the file's own (so a P1 config re-run
under P3 never shares a directory with its P1 runs).

Resumable: a run whose summary.json exists (from the same config, runtime settings aside) is
skipped; with a records folder (pipeline/report/records.py), a run not finished on disk but
recorded there is read from its record; a run with checkpoints but no summary is resumed from its
last checkpoint; `force` deletes the run directory and starts over (a record is then ignored and
rewritten). A run whose files or record come from a different config, data preparation or item
features is refused rather than silently reused or overwritten.
"""

from __future__ import annotations

import glob
import json
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.config import ExperimentConfig, load_config
from pipeline.data.prepare import identity_mismatch, reencoding
from pipeline.outputs import OutputError, is_run_directory
from pipeline.paths import default_run_dir
from pipeline.report import records
from pipeline.rundir import RunLock, RunLockedError

DEFAULT_SEEDS = (0, 1, 2)
# keys the command sets itself for every run; an override of them is refused
CONTROLLED = ("train.seed", "train.model_seed", "runtime.out")


class StaleRunError(RuntimeError):
    """A run directory holds files from a different config."""


@dataclass(frozen=True)
class RunSpec:
    source: Path                 # the config file
    key: str                     # config name (+ protocol suffix), the folder under runs_dir
    seed: int
    config: ExperimentConfig     # with seed, model_seed and runtime.out applied
    overrides: tuple[str, ...]   # the overrides applied (without the controlled keys)
    centralized: bool = False    # the config's centralized upper bound (pipeline centralized), not federated
    accept_reencoded: bool = False  # a finished run made on another encoding of its feature store counts

    @property
    def run_dir(self) -> Path:
        return Path(self.config.runtime.out)

    @property
    def summary_path(self) -> Path:
        return self.run_dir / "summary.json"


@dataclass
class RunResult:
    spec: RunSpec
    status: str                  # skipped | recorded | ran | resumed | derived | failed | missing (report_only)
    summary: dict | None = None
    error: str | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def expand_configs(patterns: list[str]) -> list[Path]:
    """Config files matching the globs, in the order given (each glob sorted); duplicates dropped."""
    paths: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else ([pattern] if Path(pattern).exists() else [])
        if not matches:
            raise FileNotFoundError(f"--configs {pattern!r}: no file matches")
        for match in matches:
            path = Path(match)
            if path.is_file() and path not in paths:
                paths.append(path)
    return paths


def _comparable(config: dict, centralized: bool = False) -> dict:
    """A config's dump read through the current schema (keys added since get their defaults),
    without the runtime section (which never changes the numbers) and, for a federated run,
    without the centralized section (which a federated run never reads)."""
    try:
        config = json.loads(ExperimentConfig.model_validate(config).model_dump_json())
    except ValueError:  # no longer a valid config: compared as stored, so it differs
        pass
    ignored = ("runtime",) if centralized else ("runtime", "centralized")
    out = {key: value for key, value in config.items() if key not in ignored}
    if isinstance(out.get("train"), dict):  # what a run also evaluated never changes its numbers
        out["train"] = {key: value for key, value in out["train"].items() if key != "also_protocols"}
    return out


MODES = ("federated", "centralized", "both")


def plan_runs(config_paths: list[Path], seeds=DEFAULT_SEEDS, overrides: list[str] = (),
              runs_dir: Path | None = None, mode: str = "federated", accept_reencoded: bool = False) -> list[RunSpec]:
    """One RunSpec per (config, seed), configs in the given order; mode 'centralized' plans each
    config's centralized upper bound instead (folder <key>-centralized), 'both' plans both.
    accept_reencoded: a finished run (on disk or recorded) whose item features differ from today's
    only as another encoding of the same feature store (pipeline.data.prepare.reencoding) counts,
    and the report names it; without it such a run is stale."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    overrides = tuple(overrides or ())
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in CONTROLLED:
            raise ValueError(f"--set {item!r}: {key} is set by the experiments command "
                             f"(seeds via --seeds, run directories via --runs-dir)")
    if len(set(seeds)) != len(list(seeds)):
        raise ValueError(f"--seeds {list(seeds)}: repeated seed")
    specs, owners = [], {}
    for path in config_paths:
        own = load_config(path)
        base = load_config(path, list(overrides))
        key = base.name
        if base.train.protocol != own.train.protocol:
            key = f"{key}-{base.train.protocol}"
        if key in owners:
            raise ValueError(f"{path} and {owners[key]} both map to run folder {key!r}: give them distinct names")
        owners[key] = path
        kinds = {"federated": (False,), "centralized": (True,), "both": (False, True)}[mode]
        if True in kinds and base.model.gfmfr is not None:
            raise ValueError(f"{path}: GFMFR has no centralized counterpart (its groups and distillation are "
                             f"federated mechanisms); plan the centralized bound of the config without gfmfr")
        if True in kinds:
            from pipeline.centralized.job import refuse_eval_schedule

            try:
                refuse_eval_schedule(base)
            except ValueError as error:
                raise ValueError(f"{path}: {error}") from None
        for centralized in kinds:
            folder = f"{key}-centralized" if centralized else key
            for seed in seeds:
                run_dir = Path(runs_dir or default_run_dir("experiments")) / folder / f"seed-{seed}"
                config = load_config(path, [*overrides, f"train.seed={seed}", f"train.model_seed={seed}",
                                            f"runtime.out={run_dir}"])
                specs.append(RunSpec(source=Path(path), key=folder, seed=int(seed), config=config,
                                     overrides=overrides, centralized=centralized,
                                     accept_reencoded=accept_reencoded))
    return specs


_IDENTITIES: dict[tuple[str, ...], dict] = {}


def current_identity(config: ExperimentConfig) -> dict:
    """PreparedDataset.identity() of the data a run of `config` would use now (the train job's
    cache, pipeline.data.cache), computed once per (working folder, data cache, data config)."""
    import os

    from pipeline.data.cache import data_cache_root
    from pipeline.data.datasets import open_dataset

    cache = data_cache_root()
    key = (os.getcwd(), str(cache), config.data.model_dump_json())
    if key not in _IDENTITIES:
        data, _ = open_dataset(config.data, cache=cache)
        _IDENTITIES[key] = data.identity()
    return _IDENTITIES[key]


def check_summary(spec: RunSpec, summary: dict, where: Path) -> None:
    """StaleRunError unless `summary` (read from `where`) was made by spec's config, runtime
    settings aside, on the current preparation of its data and its current item features
    (pipeline.data.prepare.identity_mismatch)."""
    planned = _comparable(json.loads(spec.config.model_dump_json()), spec.centralized)
    found = _comparable(summary.get("config", {}), spec.centralized)
    if found != planned:
        raise StaleRunError(f"{where} was made by a different config "
                            f"({_diff(found, planned)}); pass --force to re-run it")
    made, now = summary.get("dataset", {}), current_identity(spec.config)
    why = identity_mismatch(made, now)
    if why and spec.accept_reencoded and reencoding(made, now):
        return
    if why:
        hint = (" or, as it is another encoding of the same feature store, --accept-reencoded-features to "
                "count it" if reencoding(made, now) else "")
        raise StaleRunError(f"{where} was made on {why}; pass --force to re-run it{hint}")


def reencoded_from(spec: RunSpec, summary: dict | None) -> str | None:
    """The features fingerprint of a run accepted as made on another encoding of its feature store
    (spec.accept_reencoded), None for a run on today's features."""
    made = (summary or {}).get("dataset", {})
    if not spec.accept_reencoded or not made:
        return None
    return made["features"] if reencoding(made, current_identity(spec.config)) else None


def set_aside_unresumable(run_dir: Path, log) -> None:
    """A run stopped before its first round checkpoint leaves a folder that cannot be resumed
    (at most a checkpoints/best): it is renamed beside itself (<name>.unresumable-<UTC time>),
    never deleted, so the run can start again in its place."""
    checkpoints = run_dir / "checkpoints"
    if not (checkpoints.is_dir() and any(checkpoints.iterdir())):
        return
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = run_dir.with_name(f"{run_dir.name}.unresumable-{stamp}")
    run_dir.rename(aside)
    log(f"{run_dir} held a run stopped before its first round checkpoint: moved to {aside}, starting it again")


def run_state(spec: RunSpec) -> str:
    """done | partial | new; raises StaleRunError when the folder holds another config's run."""
    planned = _comparable(json.loads(spec.config.model_dump_json()), spec.centralized)
    if spec.summary_path.is_file():
        check_summary(spec, json.loads(spec.summary_path.read_text()), spec.summary_path)
        return "done"
    checkpoints = spec.run_dir / "checkpoints"
    if spec.centralized:
        from pipeline.centralized.job import latest_checkpoint

        partial = latest_checkpoint(spec.run_dir) is not None
    else:
        partial = checkpoints.is_dir() and any(checkpoints.glob("round-*/manifest.json"))
    if partial:
        config_file = spec.run_dir / "config.yaml"
        if config_file.is_file():
            found = _comparable(yaml.safe_load(config_file.read_text()) or {}, spec.centralized)
            if found != planned:
                raise StaleRunError(f"{spec.run_dir} holds a partial run of a different config "
                                    f"({_diff(found, planned)}); pass --force to start it over")
        return "partial"
    return "new"


def _diff(found: dict, planned: dict, prefix: str = "") -> str:
    """The first few dotted keys whose values differ."""
    keys = []
    for key in sorted(set(found) | set(planned)):
        a, b = found.get(key), planned.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _diff(a, b, f"{prefix}{key}.")
            if inner:
                keys.append(inner)
        elif a != b:
            keys.append(f"{prefix}{key}: {a!r} there, {b!r} planned")
    return "; ".join(keys[:3])


def recorded_result(spec: RunSpec, records_dir: Path) -> RunResult | None:
    """The run read from its record (status 'recorded'), None without one; StaleRunError when the
    record is not of this config and data."""
    record = records.read_record(records_dir, spec.key, spec.seed)
    if record is None:
        return None
    check_summary(spec, record["summary"], records.record_path(records_dir, spec.key, spec.seed))
    return RunResult(spec, "recorded", summary=record["summary"], extra={"metrics": record["metrics"]})


def keep_record(result: RunResult, records_dir: Path) -> None:
    """Write (or refresh) the record of a run finished on disk."""

    records.write_record(records_dir, records.make_record(result.spec.key, result.spec.seed, result.summary,
                                                          _disk_rows(result.spec)))


def _disk_rows(spec: RunSpec) -> list[dict]:
    """The metrics.jsonl rows of spec's run directory ([] without one)."""
    return records.read_metrics(spec.run_dir) if (spec.run_dir / "metrics.jsonl").is_file() else []


# what train, centralized and a failed run leave in a run directory
RUN_ENTRIES = {"config.yaml", "metrics.jsonl", "summary.json", "tb", "checkpoints", "ray_train", "error.txt", ".lock"}


def start_over(run_dir: Path) -> None:
    """--force: empty a run directory under its lock, so a job still writing it is never deleted
    from under it (RunLockedError names the job); a folder that is not a run directory is refused."""
    from pipeline.federated.runtime.run import empty_run_dir

    entries = {entry.name for entry in run_dir.iterdir()} if run_dir.is_dir() and not run_dir.is_symlink() else None
    if entries is None or not (is_run_directory(run_dir) or entries <= RUN_ENTRIES):
        raise OutputError(f"--force: refusing to delete {run_dir}: it is not a run directory")
    with RunLock(run_dir, command="experiments --force"):
        empty_run_dir(run_dir)


def run_one(spec: RunSpec, force: bool = False, log=None, report_only: bool = False,
            records_dir: Path | None = None) -> RunResult:
    """Run, resume, skip or read from its record one (config, seed); never raises for a failing
    run (status 'failed'). With report_only nothing is started: an unfinished, unrecorded run is
    'missing'. With records_dir every run finished on disk leaves its record there."""
    from pipeline.centralized.job import train_centralized
    from pipeline.federated.runtime.run import train

    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    started = time.perf_counter()
    try:
        if force and spec.run_dir.exists():
            start_over(spec.run_dir)
        state = run_state(spec)
        if state == "done":
            result = RunResult(spec, "skipped", summary=json.loads(spec.summary_path.read_text()))
        else:
            recorded = recorded_result(spec, records_dir) if records_dir is not None and not force else None
            if recorded is not None:
                return recorded
            if report_only:
                return RunResult(spec, "missing", error=f"not run ({state})")
            if state == "new":
                set_aside_unresumable(spec.run_dir, log)
            run = train_centralized if spec.centralized else train
            summary = run(spec.config, resume=state == "partial", quiet=True)
            result = RunResult(spec, "resumed" if state == "partial" else "ran", summary=summary,
                               seconds=time.perf_counter() - started)
        if records_dir is not None:
            keep_record(result, records_dir)
        return result
    except (StaleRunError, records.RecordError, RunLockedError, OutputError) as error:
        return RunResult(spec, "failed", error=str(error), seconds=time.perf_counter() - started)
    except Exception as error:  # a failing run is reported, the others go on
        detail = traceback.format_exc()
        try:
            spec.run_dir.mkdir(parents=True, exist_ok=True)
            (spec.run_dir / "error.txt").write_text(detail)
        except OSError:
            pass
        log(detail)
        return RunResult(spec, "failed", error=f"{type(error).__name__}: {error}",
                         seconds=time.perf_counter() - started)


def derive(spec: RunSpec, twin: RunResult) -> RunResult | None:
    """The run of `spec` (one protocol) read from `twin`, the same config and seed trained under
    another protocol that also evaluated spec's (train.also_protocols): its summary's `also`
    report for that protocol and the rows it recorded, when that report is complete; None
    otherwise. The training is the same run's, so these are the numbers spec's own run would give
    (tests/equivalence/test_also_protocols.py)."""
    protocol = spec.config.train.protocol
    also = ((twin.summary or {}).get("also") or {}).get(protocol)
    if twin.status not in ("skipped", "recorded", "ran", "resumed") or not also or not also["complete"]:
        return None
    # the run's own config, read as spec's protocol (with the run's protocol as the one also evaluated):
    # checked against spec's like any summary, so a twin of another config or data is refused
    trained = twin.summary["config"]["train"]
    config = {**twin.summary["config"], "train": {**trained, "protocol": protocol, "also_protocols": [
        trained["protocol"], *(p for p in trained.get("also_protocols", ()) if p != protocol)]}}
    summary = {**twin.summary, "config": config, "selection": also["selection"], "rounds_run": also["rounds_run"],
               "evaluation": {**twin.summary.get("evaluation", {}), "final": also["final"]},
               "derived_from": {"key": twin.spec.key, "seed": twin.spec.seed,
                                "protocol": twin.spec.config.train.protocol},
               "seconds_total": None, "timing": None}  # the time is the twin's, counted there
    summary.pop("also", None)
    check_summary(spec, summary, twin.spec.summary_path)
    rows = twin.extra["metrics"] if "metrics" in twin.extra else _disk_rows(twin.spec)
    prefix = f"{protocol}/"
    renamed = [{**{k: v for k, v in row.items() if not k.startswith(("valid/", "test/", "p1/", "p3/"))},
                **{k[len(prefix):]: v for k, v in row.items() if k.startswith(prefix)}}
               for row in rows[:also["rounds_run"]]]
    return RunResult(spec, "derived", summary=summary, extra={"metrics": renamed})


def run_experiments(specs: list[RunSpec], force: bool = False, log=None, report_only: bool = False,
                    records_dir: Path | None = None) -> list[RunResult]:
    """Every spec in order; one progress line per run on stderr (or `log`). A spec of a config and
    seed that an earlier spec trained with its protocol in train.also_protocols is read from that
    run (derive) instead of being trained again."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    results = []
    twins: dict[tuple, RunResult] = {}  # (config file, seed, centralized, protocol also evaluated) -> run
    for index, spec in enumerate(specs, 1):
        twin = twins.get((spec.source, spec.seed, spec.centralized, spec.config.train.protocol))
        try:
            result = derive(spec, twin) if twin is not None else None
        except StaleRunError as error:
            result = RunResult(spec, "failed", error=str(error))
        if result is None:
            result = run_one(spec, force=force, log=log, report_only=report_only, records_dir=records_dir)
        if made_on := reencoded_from(spec, result.summary):
            result.extra["reencoded_from"] = made_on
        for other in spec.config.train.also_protocols:
            twins[(spec.source, spec.seed, spec.centralized, other)] = result
        results.append(result)
        head = f"[{index}/{len(specs)}] {spec.key} seed {spec.seed}: {result.status}"
        if result.summary is not None:
            selection = result.summary["selection"]
            metric = selection["metric"].split("/")[-1]
            unit = "epoch" if spec.centralized else "round"
            head += (f" (best {unit} {selection['best_round']} of {result.summary.get('rounds_run')}, "
                     f"valid {metric} {100 * selection['valid'][metric]:.2f}, "
                     f"test {metric} {100 * selection['test'][metric]:.2f}")
            head += f", {result.seconds:.0f} s)" if result.status in ("ran", "resumed") else ")"
            if result.status == "derived":
                head += f" from {result.summary['derived_from']['key']} seed {result.spec.seed}"
        elif result.error:
            head += f": {result.error}"
        log(head)
    return results
