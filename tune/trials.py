"""A table of a sweep's trials, from its folder: each trial's parameters, how many rounds it ran
(ASHA stops the weak ones early), its best validation round by the same rule as `pipeline train`
(the first round with the highest validation metric) and that metric. Validation only: a sweep
selects on validation, so the table shows nothing else.

    python -m tune.trials runs/sweeps/ml_pfedrec --space configs/sweeps/movielens_pfedrec.yaml \
        --out results/sweeps/ml_pfedrec.md
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path


def best_round(metrics_path: Path, metric: str) -> tuple[int | None, float | None, int]:
    """(best round, its value, rounds run) of a run's metrics.jsonl: strictly better rule."""
    best, value, rounds = None, None, 0
    if not metrics_path.is_file():
        return best, value, rounds
    for line in metrics_path.read_text().splitlines():
        row = json.loads(line)
        rounds += 1
        score = row.get(metric)
        if score is not None and (value is None or score > value):
            best, value = row["round"], score
    return best, value, rounds


def trial_rows(sweep_dir: Path, metric: str) -> list[dict]:
    rows = []
    for params_path in sorted(Path(sweep_dir).glob("*/params.json")):
        trial = params_path.parent
        params = json.loads(params_path.read_text())
        best, value, rounds = best_round(trial / "run" / "metrics.jsonl", metric)
        rows.append({"trial": trial.name, "params": params, "rounds": rounds, "best_round": best, "value": value})
    return sorted(rows, key=lambda r: -(r["value"] if r["value"] is not None else -1))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render(rows: list[dict], metric: str, title: str, command: str, planned_rounds: int | None,
           starts: list[dict] = (), notes: list[str] = ()) -> str:
    keys = sorted({key for row in rows for key in row["params"]})
    lines = [f"<!-- made by: {command} -->", f"# {title}", "",
             f"{len(rows)} trials, best first, by validation {metric.split('/')[-1].upper()} at each trial's best "
             f"round (the first round with the highest value, as `pipeline train` selects). "
             f"Trials that ran fewer rounds{f' than {planned_rounds}' if planned_rounds else ''} were stopped early "
             f"by ASHA. A trial marked *start* is one of the space's start points (a known recipe, tried first); "
             f"the others are Optuna's.", "",
             "| " + " | ".join(["rank", *keys, "rounds run", "best round", f"valid {metric.split('/')[-1]}"]) + " |",
             "|" + "---|" * (len(keys) + 4)]
    for rank, row in enumerate(rows, 1):
        value = f"{100 * row['value']:.2f}" if row["value"] is not None else "—"
        mark = " (*start*)" if row["params"] in starts else ""
        lines.append("| " + " | ".join([f"{rank}{mark}", *(_fmt(row["params"].get(k)) for k in keys), str(row["rounds"]),
                                        "—" if row["best_round"] is None else str(row["best_round"]), value]) + " |")
    return "\n".join([*lines, *(f"\n{note}" for note in notes)])


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
    base = space.config(space.example())
    metric = space.metric or f"valid/{base.train.selection()}"
    rows = trial_rows(args.sweep_dir, metric)
    if not rows:
        raise FileNotFoundError(f"{args.sweep_dir}: no trial folders (*/params.json)")
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    command = f"python -m tune.trials {args.sweep_dir} --space {args.space}" + (f" --out {args.out}" if args.out else "") \
        + "".join(f" --note {shlex.quote(note)}" for note in args.note)
    markdown = render(rows, metric, f"Sweep {args.sweep_dir.name}: {args.space}", command, base.train.rounds,
                      starts=space.start, notes=args.note)
    if args.out:
        write_text_atomically(args.out, markdown + "\n")
    else:
        print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
