"""`python -m pipeline <command>`: every job of the project, one CLI.

Commands that produce figures accept --json (one JSON document on stdout).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from pipeline.data.cache import data_cache_root
from pipeline.data.datasets import NAMED, DatasetConfig, load_raw, open_dataset
from pipeline.data.loaders import FORMATS, detect_format
from pipeline.data.prepare import PrepareConfig
from pipeline.data.schema import DataError
from pipeline.data.store import write_text_atomically
from pipeline.paths import default_run_dir

RUNS_ROOT_HELP = "$PIPELINE_RUNS, else ~/.local/share/fedmm-pipeline/runs"
DATA_CACHE_HELP = ("prepared-data cache (default: $PIPELINE_DATA_CACHE, else "
                   "$XDG_CACHE_HOME/fedmm-pipeline/prepared, i.e. ~/.cache/fedmm-pipeline/prepared)")


def _add_dataset_args(parser: argparse.ArgumentParser, positional: bool = True, many: bool = False) -> None:
    group = parser.add_argument_group("dataset")
    group.add_argument("--dataset", default=None, nargs="+" if many else None,
                       help=f"named dataset: {', '.join([*NAMED, 'synthetic'])} (default synthetic)")
    group.add_argument("--format", choices=[*FORMATS, "synthetic"],
                       help="loader for PATH (default: told by the files in the PATH folder)")
    if positional:
        group.add_argument("path", nargs="?", type=Path, help="dataset folder or file")
    group.add_argument("--rating-threshold", type=float, default=None, help="keep ratings >= this")
    group.add_argument("--min-user", type=int, default=None,
                       help="k-core minimum per user (0 disables; default 5, movielens 0)")
    group.add_argument("--min-item", type=int, default=None,
                       help="k-core minimum per item (0 disables; default 5, movielens 0)")
    group.add_argument("--allow-duplicates", action="store_true",
                       help="let exact duplicate rows through (the protocol drops them)")
    group.add_argument("--skip-missing", action="store_true",
                       help="drop rows with an empty user, item or timestamp (or a line cut short) and count "
                            "them, instead of refusing the file")
    group.add_argument("--ignore-split-label", action="store_true", help="re-split even if a split ships")
    group.add_argument("--eval-seed", type=int, default=0, help="seed of the P1 negatives")
    group.add_argument("--synthetic-users", type=int, default=None)
    group.add_argument("--synthetic-items", type=int, default=None)
    group.add_argument("--synthetic-seed", type=int, default=None)


def _dataset_config(args, name: str | None = None) -> DatasetConfig:
    # a PATH without --dataset is labelled by its folder's name (DatasetConfig's default)
    name = name or args.dataset or (None if getattr(args, "path", None) else "synthetic")
    synthetic = {key: value for key, value in (("n_users", args.synthetic_users),
                                               ("n_items", args.synthetic_items),
                                               ("seed", args.synthetic_seed)) if value is not None}
    path = getattr(args, "path", None)
    fmt = args.format
    if fmt is None and path is not None and args.dataset is None:  # a folder: its files say how to read it
        fmt = detect_format(path)
    return DatasetConfig(
        name=name,
        format=fmt,
        path=path,
        loader_options={**({"allow_duplicates": True} if args.allow_duplicates else {}),
                        **({"skip_missing": True} if args.skip_missing else {})},
        protocol=PrepareConfig(**{key: value for key, value in (
            ("rating_threshold", args.rating_threshold), ("min_user", args.min_user), ("min_item", args.min_item),
            ("use_predefined_split", False if args.ignore_split_label else None)) if value is not None}),
        eval_seed=args.eval_seed,
        synthetic=synthetic,
    )


def cmd_data_stats(args) -> int:
    """What a dataset looks like after preparation; with --config, exactly what that experiment's
    training prepares and reads; with --features, a feature store checked against the dataset."""
    from pipeline.data.negatives import P1_NEGATIVES

    experiment = None
    if args.config is not None:
        if args.path is not None or args.dataset is not None:
            raise ValueError("data stats: give a dataset (PATH or --dataset) or --config, not both")
        experiment = _run_config(argparse.Namespace(config=args.config, set=args.set, out=None))
        config = experiment.data
    else:
        config = _dataset_config(args)
    if args.features is not None:
        config = config.model_copy(update={"features": args.features})
    raw = load_raw(config)  # a feature store is read and checked here (ids, shapes, finite values)
    if experiment is not None:  # as train opens it: the data cache, the fusion module's feature check
        from pipeline.federated.runtime.run import open_checked

        experiment = experiment.model_copy(update={"data": config})
        data, negatives = open_checked(experiment)
    else:
        data, negatives = open_dataset(config)
    inter = raw.interactions
    stats = {
        "dataset": data.name,
        "raw": {"users": int(len(set(inter.user.tolist()))), "items": int(len(set(inter.item.tolist()))),
                "interactions": len(inter)},
        "skipped_rows_missing_fields": int(raw.source.get("dropped_missing", 0)),
        "users": data.n_users,
        "items": data.n_items,
        "interactions": int(data.train_indptr[-1]) + 2 * data.n_users,
        "split": {"train": int(data.train_indptr[-1]), "valid": data.n_users, "test": data.n_users},
        "density": (int(data.train_indptr[-1]) + 2 * data.n_users) / (data.n_users * data.n_items),
        "train_items_per_user": {"min": int(data.train_counts.min()), "median": float(np.median(data.train_counts)),
                                 "max": int(data.train_counts.max())},
        "cold_test_items": int((data.item_popularity()[data.test_item] == 0).sum()),
        "features": {name: list(matrix.shape) for name, matrix in data.features.items()},
        "catalogue": None if data.catalogue is None else {
            "items": len(data.catalogue), "with_text": int((data.catalogue.text != "").sum()),
            "with_image": int((data.catalogue.image != "").sum())},
        "p1_users_with_fewer_negatives": negatives.short_users,
        "p1_negatives_per_user": P1_NEGATIVES,
        "fingerprint": data.fingerprint(),
        "protocol": config.effective_protocol().model_dump(),
        "protocol_steps": data.stats,
    }
    if config.features is not None:
        stats["feature_store"] = _store_check(config.features, raw, data)
    if experiment is not None:
        stats["training"] = _training_view(experiment, data, negatives)
    if args.json:
        print(json.dumps(stats, indent=2, default=str))
    else:
        for key, value in stats.items():
            print(f"{key:32s} {value}")
    return 0



def _store_check(store: Path, raw, data) -> dict:
    """A feature store that load_raw accepted (every interacted item has a finite row of the
    manifest's width): where it is, its widths, and how its ids meet the dataset's."""
    from pipeline.encode.store import load_features

    ids, matrices, manifest = load_features(store)
    interacted = np.unique(np.asarray(raw.interactions.item))
    try:
        extra = int((~np.isin(ids, interacted.astype(ids.dtype))).sum())
    except (TypeError, ValueError):
        extra = len(ids)
    return {"path": str(Path(store).resolve()), "items": len(ids),
            "modalities": {name: {"dim": int(m.shape[1]), "model": manifest["modalities"][name].get("model_id")}
                           for name, m in matrices.items()},
            "check": f"ok: all {len(interacted)} interacted items have a row; values finite; "
                     f"shapes as the manifest says",
            "rows_not_in_the_interactions": extra,
            "prepared_items_with_features": data.n_items}


def _training_view(experiment, data, negatives) -> dict:
    """What the experiment's training reads of the prepared dataset: evaluation protocol and
    negatives, and the features its fusion module takes in (modality -> [items, width])."""
    from pipeline.data.negatives import P1_NEGATIVES

    train = experiment.train
    if train.protocol == "p1":
        evaluation = (f"P1: the held-out item among {P1_NEGATIVES} sampled negatives (seed {negatives.seed}; "
                      f"{negatives.short_users} users with fewer)")
    else:
        evaluation = "P3: full ranking of every item, the user's training items masked"
    fusion = experiment.model.fusion
    if fusion is None:
        reads = "ids only (no fusion module; item features are not read)"
    else:
        reads = {m: (["id embedding", experiment.model.dim] if m == "id" else list(data.features[m].shape))
                 for m in fusion.modalities}
    return {"run": experiment.name, "backbone": experiment.model.backbone, "evaluation": evaluation,
            "split": {"train": int(data.train_indptr[-1]), "valid": data.n_users, "test": data.n_users},
            "fusion_reads": reads, "rounds": train.rounds,
            "data_cache": str(data_cache_root())}


def cmd_data_prepare(args) -> int:
    config = _dataset_config(args)
    cache = data_cache_root(args.out)
    data, _ = open_dataset(config, cache=cache)
    print(f"prepared {data.name}: {data.n_users} users, {data.n_items} items, "
          f"fingerprint {data.fingerprint()} under {cache}")
    return 0


def cmd_data_synth(args) -> int:
    from pipeline.data import synthetic
    from pipeline.outputs import check_output

    overrides = {key: value for key, value in (("n_users", args.users), ("n_items", args.items),
                                               ("n_groups", args.groups), ("seed", args.seed))
                 if value is not None}
    if args.no_images:
        overrides["images"] = False
    config = synthetic.SyntheticConfig(**overrides)
    check_output(args.out, synthetic.SYNTHETIC_OUTPUT, overwrite=args.overwrite)  # before generating
    folder = synthetic.write(synthetic.generate(config), args.out, overwrite=args.overwrite)
    print(f"wrote synthetic dataset ({config.n_users} users, {config.n_items} items) to {folder}")
    return 0


def cmd_baselines(args) -> int:
    from pipeline.eval.baselines import evaluate_baselines
    from pipeline.outputs import check_report_file

    if args.out and not args.json:  # before any dataset is read
        check_report_file(args.out, "baselines", inputs=[*args.paths, *(args.config or [])])
    rows, described = [], []
    cache = args.workdir / "prepared" if args.workdir is not None else data_cache_root(args.data_cache)
    for config in _baseline_datasets(args):
        started = time.perf_counter()
        data, negatives = open_dataset(config, cache=cache)
        rows += evaluate_baselines(data, negatives, names=args.baseline, protocols=args.protocol, ks=args.k)
        described.append(_describe(data, config, negatives, time.perf_counter() - started))
    if args.json:
        print(json.dumps({"datasets": described, "rows": rows}, indent=2, default=str))
    else:
        text = _baseline_report(rows, described, args)
        print(text)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            write_text_atomically(Path(args.out), text + "\n")
    return 0


def _baseline_datasets(args) -> list[DatasetConfig]:
    """The datasets of `baselines`, in order: each --dataset name, each PATH (a folder or file read
    by the --format loader), each --config's data section (everything the config says
    about its dataset: format, path, features, protocol, P1 seed); synthetic when none is given.
    The protocol options (--rating-threshold, --min-user, ...) apply to names and paths."""
    from pipeline.config import load_config

    found = [_dataset_config(args, name=name) for name in args.dataset or []]
    for path in args.paths:
        found.append(_dataset_config(argparse.Namespace(**{**vars(args), "path": path, "dataset": None})))
    found += [load_config(config, []).data for config in args.config or []]
    return found or [_dataset_config(args, name="synthetic")]


def _describe(data, config: DatasetConfig, negatives, seconds: float) -> dict:
    return {"dataset": data.name, "users": data.n_users, "items": data.n_items,
            "train": int(data.train_indptr[-1]), "split": data.stats.get("split"),
            "k_core": data.stats.get("k_core"), "rating_threshold": config.protocol.rating_threshold,
            "eval_seed": negatives.seed, "p1_short_users": negatives.short_users,
            "fingerprint": data.fingerprint(), "seconds": round(seconds, 2)}


def _baseline_report(rows, described, args) -> str:
    from pipeline.eval.tables import markdown_table, metric_columns

    command = "python -m pipeline " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    parts = [f"<!-- made by: {command} -->", "# Trivial baselines", ""]
    for info in described:
        parts.append(f"- **{info['dataset']}**: {info['users']} users, {info['items']} items, "
                     f"{info['train']} training interactions; split: {info['split']}; k-core: "
                     f"{info['k_core']}; rating threshold: {info['rating_threshold']}; "
                     f"P1 negatives seed {info['eval_seed']} ({info['p1_short_users']} users with < 99); "
                     f"fingerprint `{info['fingerprint']}`")
    parts.append("- No learning, no encoder, no run seed: each number is exact for its split. "
                 "Ties are ranked pessimistically. Values in %.")
    for protocol in args.protocol:
        title = {"p3": "P3: full ranking, training items masked",
                 "p1": "P1: held-out item among 99 sampled negatives"}[protocol]
        selected = [row for row in rows if row["protocol"] == protocol.upper()]
        parts += ["", f"## {title}", "", markdown_table(selected, metric_columns(args.k),
                                                        ["dataset", "method", "split"])]
    return "\n".join(parts)


def _run_config(args, *extra: str):
    """The experiment config of a train-like command: --config, --set, --out and `extra` overrides."""
    from pipeline.config import load_config

    overrides = [*(args.set or []), *extra]
    if args.out:
        overrides.append(f"runtime.out={args.out}")
    return load_config(args.config, overrides)


def _print_selection(selection: dict, head: str) -> None:
    print(f"{head} {selection['best_round']} by {selection['metric']}")
    for split in ("valid", "test"):
        cells = "  ".join(f"{k} {100 * v:.2f}" for k, v in selection[split].items())
        print(f"  {split:5s} {cells}")


def cmd_train(args) -> int:
    """Federated training of one experiment config."""
    from pipeline.federated.runtime.run import train

    summary = train(_run_config(args), resume=args.resume, address=args.address, quiet=args.json)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        _print_selection(summary["selection"], "best round")
        privacy = summary.get("privacy")
        if privacy:
            print(f"client-level DP: ({privacy['epsilon']:.3g}, {privacy['delta']:g})-DP after {privacy['rounds']} "
                  f"rounds (clip {privacy['clip']:g}, noise multiplier {privacy['noise_multiplier']:g}, sampling "
                  f"rate {privacy['sample_rate']:g}; {privacy['accountant']})")
        skipped = summary.get("dataset", {}).get("skipped_rows_missing_fields")
        if skipped:
            print(f"input rows skipped for an empty user, item or timestamp (skip_missing): {skipped}")
        if summary.get("damaged_checkpoints"):
            print(f"damaged checkpoints skipped: {'; '.join(summary['damaged_checkpoints'])}")
        print(f"run directory: {summary['run_dir']} (TensorBoard: tensorboard --logdir {summary['run_dir']}/tb)")
    return 0


def cmd_centralized(args) -> int:
    """The centralized upper bound of one experiment config (pooled data, Ray Train)."""
    from pipeline.centralized.job import train_centralized

    workers = [f"centralized.workers={args.workers}"] if args.workers is not None else []
    summary = train_centralized(_run_config(args, *workers), resume=args.resume, address=args.address,
                                quiet=args.json)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        _print_selection(summary["selection"], f"centralized, {summary['workers']} Ray Train worker(s), "
                                               f"{summary['epochs_run']} epochs: best epoch")
        print(f"run directory: {summary['run_dir']} (TensorBoard: tensorboard --logdir {summary['run_dir']}/tb)")
    return 0


def cmd_sweep(args) -> int:
    """A Ray Tune sweep of a search space (tune/sweep.py); prints the table of its trials (also in
    <storage>/<name>/trials.md and trials.csv) and the command that trains the best one, as is."""
    from tune.sweep import run_sweep

    done = run_sweep(args.space, samples=args.samples, concurrency=args.concurrency, storage=args.storage,
                     name=args.name, seed=args.seed, resume=args.resume, export=args.export,
                     grace_rounds=args.grace_rounds, keep_schedule=args.keep_sweep_schedule)
    best = done.best
    summary = {"storage": str(done.path), "metric": done.metric, "best_point": best["params"],
               "best_trial": best["trial"], "best_round": best["best_round"], "best_valid": best["valid"],
               "best_config": str(done.export), "best_run_dir": str(done.run_dir), "best_command": done.command,
               "schedule_left_out": done.dropped, "table": str(done.table), "table_csv": str(done.table_csv),
               "trials": [{**row, "trial": row["path"]} for row in done.rows]}
    if args.json:  # one line, the last: Ray Tune may write to stdout before it
        print(json.dumps(summary, default=str))
        return 0
    print(done.table.read_text())
    print(f"table: {done.table} (and {done.table_csv.name})")
    print(f"TensorBoard: tensorboard --logdir {done.path}   (one run per trial; the HParams tab compares them)")
    print(f"best: trial {best['trial']}, {done.metric} {100 * best['valid']:.2f} at round {best['best_round']}")
    if done.dropped:
        print(f"best config: {done.export}, with the base config's schedule (the trials ran with "
              f"{', '.join(done.dropped)}; --keep-sweep-schedule keeps it)")
    else:
        print(f"best config: {done.export}")
    print(f"train it (into {done.run_dir}):\n  {done.command}")
    return 0


def cmd_run(args) -> int:
    """The main job on the embedded default: synthetic data, local Ray, baselines table."""
    from pipeline.main_job import run_main

    return run_main(args)


def cmd_recommend(args) -> int:
    """A user's top-K items from a trained run (its own personal state + the globals)."""
    if args.k < 1:  # before the run is opened
        raise ValueError(f"recommend --k {args.k}: the number of items to recommend must be 1 or more")
    from pipeline.trained import MODEL_CARD, TrainedRun

    if (args.run / MODEL_CARD).is_file():  # an export folder
        run = TrainedRun.open_export(args.run, data_cache=args.data_cache)
    else:
        run = TrainedRun.open(args.run, checkpoint=args.checkpoint, data_cache=args.data_cache)
    recs = run.recommend(args.user, args.k)
    if args.json:
        print(json.dumps({"run": str(args.run), "checkpoint": str(run.source), "round": run.round, "user": str(args.user),
                          "k": args.k, "items": [vars(r) for r in recs]}, indent=2))
        return 0
    print(f"top {args.k} for user {args.user} ({run.model_card()['method']}, round {run.round}; training items "
          f"excluded):")
    for r in recs:
        image = f"  [{r.image}]" if r.image else ""
        print(f"{r.rank:3d}. {r.item_id:>8s}  {r.score:8.3f}  {r.title}{image}")
    return 0


def cmd_export(args) -> int:
    """A trained run's model as safetensors + a JSON model card."""
    from pipeline.data.cache import data_cache_root
    from pipeline.outputs import check_output
    from pipeline.trained import EXPORT_OUTPUT, TrainedRun

    inputs = [args.run, data_cache_root(args.data_cache)]
    check_output(args.out, EXPORT_OUTPUT, inputs=inputs, overwrite=args.overwrite)  # before anything loads
    run = TrainedRun.open(args.run, checkpoint=args.checkpoint, data_cache=args.data_cache)
    out = run.export(args.out, overwrite=args.overwrite, inputs=inputs)
    card = run.model_card()
    if args.json:
        print(json.dumps({"export": str(out), **{k: card[k] for k in ("method", "round", "metrics_at_best_round")}},
                         indent=2, default=str))
    else:
        print(f"exported {card['method']} (round {run.round}) to {out}")
    return 0


def cmd_features_import(args) -> int:
    """Your own item embeddings (an id list + one matrix per modality) as a validated feature store."""
    from pipeline.encode.imported import import_embeddings

    matrices = {name: path for name, path in (("text", args.text), ("image", args.image)) if path is not None}
    data = None
    if args.data is not None:
        data = DatasetConfig(path=args.data, format=args.format or detect_format(args.data))
    manifest = import_embeddings(args.ids, matrices, args.out, data=data, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(manifest, indent=2, default=str))
    else:
        widths = ", ".join(f"{name} {info['dim']}-d" for name, info in manifest["modalities"].items())
        print(f"feature store {args.out}: {manifest['item_count']} items ({widths})"
              + (f", checked against {data.name}" if data is not None else ""))
        print(f"train with it: data.features={Path(args.out).resolve()}")
    return 0


def cmd_report(args) -> int:
    """A Markdown report (table + PNG plots) of trained runs."""
    from pipeline.outputs import check_output
    from pipeline.report.runs import REPORT_OUTPUT, report_runs

    # its own earlier report is refreshed; anything else, a run directory or an input is refused
    check_output(args.out, REPORT_OUTPUT, inputs=args.runs, overwrite=True)
    command = "python -m pipeline report " + " ".join(shlex.quote(str(d)) for d in args.runs) + f" --out {args.out}"
    report = report_runs(args.runs, args.out, title=args.title, command=command)
    if args.json:
        print(json.dumps({k: report[k] for k in ("path", "figures", "tables")}, indent=2, default=str))
    else:
        print(f"report: {report['path']}" + "".join(f"\nfigure: {f}" for f in report["figures"]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="inspect, prepare and generate datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    stats = data_commands.add_parser("stats", help="users, items, interactions, split sizes, feature shapes")
    _add_dataset_args(stats)
    stats.add_argument("--config", type=Path, metavar="YAML", help="an experiment config: show exactly what its "
                       "training prepares and reads (the dataset after its protocol, split sizes, negatives, the "
                       "feature modalities and widths its fusion module takes in)")
    stats.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="overrides of --config, as train takes them")
    stats.add_argument("--features", type=Path, metavar="STORE", help="check a feature store against the dataset "
                       "(every interacted item has a row; shapes as its manifest says; finite values); a failure "
                       "names the file, the row and why, and exits 2")
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(func=cmd_data_stats)
    prep = data_commands.add_parser("prepare", help="apply the protocol and persist split + P1 negatives")
    _add_dataset_args(prep)
    prep.add_argument("--out", type=Path, help="folder for prepared datasets (default: the data cache that train, "
                      "recommend, export and baselines read; see --data-cache of those)")
    prep.set_defaults(func=cmd_data_prepare)
    synth = data_commands.add_parser("synth", help="write the synthetic multimodal dataset")
    synth.add_argument("--out", type=Path, required=True, help="a new folder (or an earlier synthetic dataset "
                       "with --overwrite)")
    synth.add_argument("--overwrite", action="store_true", help="replace an earlier `data synth` output in --out")
    synth.add_argument("--users", type=int)
    synth.add_argument("--items", type=int)
    synth.add_argument("--groups", type=int)
    synth.add_argument("--seed", type=int)
    synth.add_argument("--no-images", action="store_true")
    synth.set_defaults(func=cmd_data_synth)

    base = commands.add_parser("baselines", help="trivial rankings under P1 and P3, as tables")
    _add_dataset_args(base, positional=False, many=True)
    base.add_argument("paths", nargs="*", type=Path, metavar="PATH",
                      help="dataset folders or files (their loader: --format); before --dataset, "
                           "whose names run to the next option")
    base.add_argument("--config", nargs="+", type=Path, metavar="YAML",
                      help="experiment configs: the dataset of each one's data: section, as a run of it reads it")
    base.add_argument("--baseline", nargs="+", default=["popularity"],
                      choices=["popularity", "cold-first-then-popularity", "ascending-item-id"])
    base.add_argument("--protocol", nargs="+", default=["p3", "p1"], choices=["p1", "p3"])
    base.add_argument("-k", "--k", nargs="+", type=int, default=[10, 20, 50])
    base.add_argument("--data-cache", type=Path, help=DATA_CACHE_HELP)
    base.add_argument("--workdir", type=Path, default=None, help="(older spelling) cache under WORKDIR/prepared")
    base.add_argument("--out", type=Path, help="also write the Markdown report here")
    base.add_argument("--json", action="store_true")
    base.set_defaults(func=cmd_baselines)

    train = commands.add_parser("train", help="federated training of an experiment config")
    train.add_argument("--config", type=Path, help="experiment YAML (configs/...)")
    train.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. train.rounds=5")
    train.add_argument("--out", type=Path, help="run directory (runtime.out)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local instance)")
    train.add_argument("--json", action="store_true")
    train.set_defaults(func=cmd_train)

    central = commands.add_parser("centralized", help="the centralized upper bound: the same model on pooled data "
                                  "(Ray Train, data-parallel)")
    central.add_argument("--config", type=Path, help="experiment YAML (configs/...); its centralized: section applies")
    central.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. centralized.epochs=20")
    central.add_argument("--out", type=Path, help="run directory (runtime.out)")
    central.add_argument("--workers", type=int, help="Ray Train workers (centralized.workers)")
    central.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    central.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local instance)")
    central.add_argument("--json", action="store_true")
    central.set_defaults(func=cmd_centralized)

    sweep = commands.add_parser("sweep", help="Ray Tune + Optuna sweep of a search space (configs/sweeps/*.yaml)")
    sweep.add_argument("--space", type=Path, required=True, help="search space YAML (see tune/sweep.py)")
    sweep.add_argument("--samples", type=int, default=16, help="trials")
    sweep.add_argument("--concurrency", type=int, default=2, help="trials at once")
    sweep.add_argument("--storage", type=Path, default=default_run_dir("sweeps"),
                       help=f"Tune storage path (default {RUNS_ROOT_HELP}/sweeps)")
    sweep.add_argument("--name", required=True, help="the sweep's folder under --storage")
    sweep.add_argument("--seed", type=int, default=0, help="Optuna's seed")
    sweep.add_argument("--grace-rounds", type=int, default=2, help="ASHA: rounds before a trial can be stopped")
    sweep.add_argument("--resume", action="store_true", help="continue a stopped sweep (Tuner.restore)")
    sweep.add_argument("--export", type=Path, help="where to write the best config (default <storage>/<name>/best.yaml)")
    sweep.add_argument("--keep-sweep-schedule", action="store_true",
                       help="keep the space's schedule overrides (train.rounds, train.patience, train.eval_*, "
                            "runtime.*) in the best config; by default it gets the base config's schedule")
    sweep.add_argument("--json", action="store_true")
    sweep.set_defaults(func=cmd_sweep)

    run = commands.add_parser("run", help="the main job on the embedded default (synthetic, local Ray)")
    run.add_argument("--workdir", type=Path, default=default_run_dir("main"),
                     help=f"where the job writes everything (default {RUNS_ROOT_HELP}/main)")
    run.add_argument("--users", type=int, default=None)
    run.add_argument("--items", type=int, default=None)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--backbone", default="fcf", choices=["fedavg", "fcf", "fedncf", "pfedrec", "fedrap"])
    run.add_argument("--rounds", type=int, default=30)
    run.add_argument("--fedmr", action=argparse.BooleanOptionalAction, default=True,
                     help="also train the backbone with FedMR's fusion module on the encoded features (default on)")
    run.add_argument("--gfmfr", action=argparse.BooleanOptionalAction, default=True,
                     help="also train the backbone + FedMR + GFMFR's group-wise fusion and distillation (default on)")
    run.add_argument("--json", action="store_true")
    run.set_defaults(func=cmd_run)

    for name, func, help_text in (("recommend", cmd_recommend, "a user's top-K items from a trained run"),
                                  ("export", cmd_export, "a trained run's model as safetensors + model card")):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--run", type=Path, required=True,
                             help="a run directory (runtime.out of a train job)" + (" or an export folder" if name == "recommend" else ""))
        command.add_argument("--checkpoint", choices=["best", "last"], default="best",
                             help="best: the best validation round (default); last: the newest checkpoint")
        command.add_argument("--data-cache", type=Path, help=DATA_CACHE_HELP)
        command.add_argument("--json", action="store_true")
        if name == "recommend":
            command.add_argument("--user", required=True, help="the user's id as in the dataset's files")
            command.add_argument("--k", type=int, default=10)
        else:
            command.add_argument("--out", type=Path, required=True, help="the export folder (a new one, or an "
                                 "earlier export with --overwrite)")
            command.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
        command.set_defaults(func=func)

    report = commands.add_parser("report", help="a Markdown report (results table, PNG plots) of trained runs")
    report.add_argument("runs", nargs="+", type=Path, help="run directories (a run's seeds group into one row)")
    report.add_argument("--out", type=Path, required=True, help="folder for report.md and its PNGs")
    report.add_argument("--title")
    report.add_argument("--json", action="store_true")
    report.set_defaults(func=cmd_report)

    features = commands.add_parser("features", help="feature stores from your own item embeddings")
    feature_commands = features.add_subparsers(dest="features_command", required=True)
    imported = feature_commands.add_parser(
        "import", help="an id list + embedding matrices (.npy) -> a validated feature store that train reads")
    imported.add_argument("--ids", type=Path, required=True, help="item ids: one per line (.txt), a CSV with an "
                          "item_id column (or one column), or a .npy vector; row r of each matrix is the r-th id")
    imported.add_argument("--text", type=Path, help="text embeddings, .npy [items, width]")
    imported.add_argument("--image", type=Path, help="image embeddings, .npy [items, width]")
    imported.add_argument("--out", type=Path, required=True, help="the feature store folder (a new one, or an "
                          "earlier store with --overwrite)")
    imported.add_argument("--data", type=Path, help="a dataset folder: refuse ids it does not know and interacted "
                          "items without a row")
    imported.add_argument("--format", choices=FORMATS, help="loader of --data (default: told by its files)")
    imported.add_argument("--overwrite", action="store_true", help="replace an earlier feature store in --out")
    imported.add_argument("--json", action="store_true")
    imported.set_defaults(func=cmd_features_import)

    from pipeline.encode.cli import register as register_encode
    from pipeline.report.cli import register as register_report

    register_encode(commands)
    register_report(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DataError, ValidationError, FileExistsError, FileNotFoundError, ValueError) as error:
        from pipeline.strict import one_line

        print(f"error: {one_line(error) if isinstance(error, ValidationError) else error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as error:  # Ctrl-C: a train job says where it stopped and how to resume
        print(f"\n{str(error) or 'interrupted'}", file=sys.stderr)
        return 130
