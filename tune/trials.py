"""The trials of a sweep, read from its folder: each trial's parameters, its status (ran its schedule,
stopped by its patience, stopped early by ASHA, failed), the rounds it ran, the round `pipeline train`
selects for it and the validation (and test) metric there. Written next to the sweep as trials.md and
trials.csv; `python -m tune.trials` rebuilds the table of any sweep folder:

    python -m tune.trials runs/sweeps/ml_pfedrec --space configs/sweeps/movielens_pfedrec.yaml \
        --out results/sweeps/ml_pfedrec.md

The ranking rule, the same as `pipeline train`'s selection (pipeline/federated/strategy/selection.py):
  - a trial's selected round is the first of its evaluated rounds with the highest validation
    metric (a round counts only when strictly better than every earlier one). The rows of the
    trial's metrics.jsonl are fed to train's own Selection, in order. A trial is `pipeline train`
    itself, so its patience has already ended it where train would stop;
  - its score is the validation metric at that round; with a sampled evaluation (train.eval_users)
    the rounds are compared on the sample and the score is that round's evaluation on every user,
    the number train's summary reports;
  - trials are ranked by score, best first (ties: the earlier trial first). A trial that failed
    (ERROR: e.g. its loss stopped being finite) is listed but never ranked nor picked: its config
    fails the same way when trained, so the command exported for it could not run. A trial still
    running or cut off by Ctrl-C (`--resume` continues it) is listed unranked too.
The test metric at the selected round is shown, as train reports it; it plays no part in the ranking.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import shlex
import sys
from pathlib import Path

TABLE_MD, TABLE_CSV = "trials.md", "trials.csv"
RANKED = ("TERMINATED", "TERMINATED (early stop: patience)", "TERMINATED (stopped early by ASHA)")


def read_rows(metrics_path: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl (none when the trial never finished a round)."""
    if not metrics_path.is_file():
        return []
    return [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]


def selection_of(rows: list[dict], metric: str) -> dict | None:
    """`pipeline train`'s selection over a run's rows: the report of pipeline.federated.strategy.selection
    (best_round, valid and test at it) fed every evaluated row in order, or None when no row holds
    `metric` (e.g. 'valid/hr@10'). Under a sampled evaluation a row's full/ keys (the same state on
    every user) are passed as train passes them, so valid and test are every user's."""
    from pipeline.federated.strategy.selection import Selection

    selection = Selection(metric.removeprefix("valid/"), patience=0)  # patience: the trial already applied it
    for row in rows:
        if row.get(metric) is None:
            continue  # a round without an evaluation (train.eval_every)
        full = {k[5:]: v for k, v in row.items() if k.startswith(("full/valid/", "full/test/"))} or None
        selection.update(row["round"], row, full)
    return selection.report() if selection.best_round is not None else None


def trial_status(trial_dir: Path, rows: list[dict]) -> tuple[str, str | None]:
    """(status, error line) of a trial from its folder: ERROR when Tune wrote error.txt; TERMINATED
    when its last round says stop (its schedule's end, or its patience before it); stopped early by
    ASHA when Tune's last result says done but the run did not stop itself; else unfinished."""
    error = trial_dir / "error.txt"
    if error.is_file():
        lines = [line.strip() for line in error.read_text(errors="replace").splitlines() if line.strip()]
        return "ERROR", (lines[-1] if lines else "error.txt is empty")
    if rows and rows[-1].get("stop"):
        planned = _planned_rounds(trial_dir / "run" / "config.yaml")
        patience = planned is not None and rows[-1]["round"] + 1 < planned
        return ("TERMINATED (early stop: patience)" if patience else "TERMINATED"), None
    if rows and _last_result(trial_dir / "result.json").get("done"):
        return "TERMINATED (stopped early by ASHA)", None
    return "unfinished", None


def _planned_rounds(config_path: Path) -> int | None:
    import yaml

    if not config_path.is_file():
        return None
    return ((yaml.safe_load(config_path.read_text()) or {}).get("train") or {}).get("rounds")


def _last_result(result_path: Path) -> dict:
    """Tune's last result of a trial (result.json, one JSON object a line); {} when there is none."""
    if not result_path.is_file():
        return {}
    lines = [line for line in result_path.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else {}


def _number(name: str) -> int:
    """The trial's number in its sweep (Tune names the folders _trial_<id>_<number>_<params>...)."""
    found = re.match(r"_?[^_]+_[0-9a-f]+_(\d+)", name)
    return int(found.group(1)) if found else 0


def trial_rows(sweep_dir: Path, metric: str) -> list[dict]:
    """One row per trial folder (*/params.json) of the sweep, ranked by the rule in this module's
    docstring: rank 1, 2, ... for the trials that ended without error, best first, then the others
    (rank None) in trial order."""
    rows = []
    for params_path in Path(sweep_dir).glob("*/params.json"):
        trial = params_path.parent
        history = read_rows(trial / "run" / "metrics.jsonl")
        status, error = trial_status(trial, history)
        selection = selection_of(history, metric)
        name = metric.removeprefix("valid/")
        evaluated = [row[metric] for row in history if row.get(metric) is not None]
        rows.append({"trial": trial.name, "path": str(trial.resolve()), "number": _number(trial.name),
                     "params": json.loads(params_path.read_text()), "status": status, "error": error,
                     "rounds": len(history), "best_round": selection and selection["best_round"],
                     "valid": selection and selection["valid"].get(name),
                     "test": selection and selection["test"].get(name),
                     "last_valid": evaluated[-1] if evaluated else None,
                     "last_loss": history[-1].get("train/loss") if history else None})
    ranked = sorted((r for r in rows if r["status"] in RANKED and r["valid"] is not None),
                    key=lambda r: (-r["valid"], r["number"]))
    rest = sorted((r for r in rows if r not in ranked), key=lambda r: r["number"])
    for rank, row in enumerate(ranked, 1):
        row["rank"] = rank
    for row in rest:
        row["rank"] = None
    return ranked + rest


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _percent(value) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def render(rows: list[dict], metric: str, title: str, command: str, starts: list[dict] = (),
           notes: list[str] = ()) -> str:
    """The Markdown table: rank, parameters, status, rounds run, selected round, validation metric
    there, test metric there, validation metric at the last evaluated round (a trial that peaked
    and fell shows it here), in %."""
    keys = sorted({key for row in rows for key in row["params"]})
    name = metric.split("/")[-1]
    lines = [f"<!-- made by: {command} -->", f"# {title}", "",
             f"{len(rows)} trials. Ranked by validation {name.upper()} at each trial's selected round, the round "
             f"`pipeline train` selects: the first evaluated round with the highest validation {name.upper()} "
             f"(under a sampled evaluation, compared on the sample and reported on every user). The test "
             f"column is the test {name.upper()} at that round, as train reports it; it plays no part in the "
             f"ranking. A trial that failed (ERROR) or did not finish is listed without a rank and never picked. "
             f"A trial marked *start* is one of the space's start points (a known recipe, tried first); the "
             f"others are Optuna's.", "",
             "| " + " | ".join(["rank", *keys, "status", "rounds run", "selected round", f"valid {name}",
                                f"test {name}", f"valid {name}, last round"]) + " |",
             "|" + "---|" * (len(keys) + 7)]
    for row in rows:
        mark = " (*start*)" if row["params"] in starts else ""
        rank = "—" if row["rank"] is None else str(row["rank"])
        status = row["status"] if row["error"] is None else f"ERROR: {row['error'].split(':')[0]}"
        lines.append("| " + " | ".join([f"{rank}{mark}", *(_fmt(row["params"].get(k)) for k in keys), status,
                                        str(row["rounds"]), "—" if row["best_round"] is None else str(row["best_round"]),
                                        _percent(row["valid"]), _percent(row["test"]), _percent(row["last_valid"])])
                     + " |")
    return "\n".join([*lines, *(f"\n{note}" for note in notes)])


def render_csv(rows: list[dict], metric: str) -> str:
    """The same rows as CSV, one line per trial, the metrics as fractions (not %)."""
    keys = sorted({key for row in rows for key in row["params"]})
    name = metric.split("/")[-1]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["rank", "trial", *keys, "status", "rounds", "best_round", f"valid/{name}", f"test/{name}",
                     f"last_valid/{name}", "last_loss", "error"])
    for row in rows:
        writer.writerow(["" if row["rank"] is None else row["rank"], row["trial"],
                         *(json.dumps(row["params"][k]) if isinstance(row["params"].get(k), (list, dict))
                           else row["params"].get(k, "") for k in keys),
                         row["status"], row["rounds"], *("" if row[k] is None else row[k] for k in
                                                          ("best_round", "valid", "test", "last_valid", "last_loss")),
                         row["error"] or ""])
    return out.getvalue()


def write_tables(sweep_dir: Path, rows: list[dict], metric: str, title: str, command: str,
                 starts: list[dict] = ()) -> tuple[Path, Path]:
    """trials.md and trials.csv in the sweep's folder (each replaced whole); returns their paths."""
    from pipeline.data.store import write_text_atomically

    md, table = Path(sweep_dir) / TABLE_MD, Path(sweep_dir) / TABLE_CSV
    write_text_atomically(md, render(rows, metric, title, command, starts=starts) + "\n")
    write_text_atomically(table, render_csv(rows, metric))
    return md, table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tune.trials", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="the sweep's folder (<storage>/<name>)")
    parser.add_argument("--space", type=Path, required=True, help="the sweep's search space YAML")
    parser.add_argument("--out", type=Path, help="write the Markdown table here (else print it)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--note", action="append", default=[], help="a paragraph under the table (repeatable)")
    args = parser.parse_args(argv)
    from pipeline.data.store import write_text_atomically
    from tune.sweep import SearchSpace

    space = SearchSpace.load(args.space)
    metric = space.selection_metric()
    rows = trial_rows(args.sweep_dir, metric)
    if not rows:
        raise FileNotFoundError(f"{args.sweep_dir}: no trial folders (*/params.json)")
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    command = f"python -m tune.trials {args.sweep_dir} --space {args.space}" + (f" --out {args.out}" if args.out else "") \
        + "".join(f" --note {shlex.quote(note)}" for note in args.note)
    markdown = render(rows, metric, f"Sweep {args.sweep_dir.name}: {args.space}", command, starts=space.start,
                      notes=args.note)
    if args.out:
        write_text_atomically(args.out, markdown + "\n")
    else:
        print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
