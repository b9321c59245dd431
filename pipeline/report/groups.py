"""GFMFR's groups against the synthetic generator's planted ones, and its teacher against its students.

    python -m pipeline.report.groups --configs 'configs/synthetic_groups/*gfmfr.yaml' --seeds 0 1 2 \
        --out results/synthetic_groups_grouping.md

For every (config, seed) with `model.gfmfr`, read from the run's latest
checkpoint (the experiments command's run folders, <runs dir>/<name>/seed-<s>) the group
every user was last assigned (the server's aligned ids), and compare it with the generator's
`user_group` (regenerated from the config: the data are a pure function of it) by the adjusted
Rand index (scikit-learn), over the users that were ever grouped (synthetic data only: other
datasets have no planted groups, and get the teacher columns alone).

Beside it, the teacher as a recommender: every grouped user ranks the items by its group's
teacher scores s_g held in the checkpoint (the ones the next round distils), evaluated under
the run's protocol on validation (HR@K, K the run's largest cut-off), against the student's
own validation HR@K in that round (all users, from the run's history). Distillation can only
pull a student towards a teacher; a teacher far below its students has nothing to add.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np

from pipeline.data.store import write_text_atomically
from pipeline.federated.runtime.checkpoints import newest_intact


def run_grouping(run_dir: Path) -> tuple[int, np.ndarray, dict] | None:
    """(round, [U] latest group id of every user (-1 never grouped), the checkpoint's state) of
    a run's latest complete checkpoint, or None without one."""
    import torch

    checkpoint, _ = newest_intact(run_dir / "checkpoints")
    if checkpoint is None:
        return None
    state = torch.load(checkpoint / "global.pt", weights_only=False)
    if state.get("groups") is None:
        raise ValueError(f"{checkpoint}: not a GFMFR run (no group state)")
    return int(checkpoint.name.split("-")[1]), np.asarray(state["groups"]["known"]), state


def group_scores_hr(scores, known: np.ndarray, config, data, negatives) -> float | None:
    """Valid HR@K (the config's protocol, K its largest cut-off) of the grouped users (known [U]
    >= 0) ranking the items by their group's row of scores [G, N]; None if nobody is grouped."""
    import torch

    from pipeline.eval.protocols import evaluate

    grouped = np.flatnonzero(known >= 0)
    if not len(grouped):
        return None
    group, k = torch.as_tensor(known), max(config.train.eval_ks)
    return evaluate(lambda users: scores.double()[group[users]], data, config.train.protocol, "valid",
                    negatives=negatives, ks=(k,), users=grouped)[f"hr@{k}"]


def teacher_against_student(config, state: dict, round_: int, known: np.ndarray, data, negatives) -> dict:
    """{'teacher': valid HR@K of the grouped users ranked by their group's teacher scores,
    'student': the run's valid HR@K in round `round_`} (None where the checkpoint lacks them)."""
    metric = f"hr@{max(config.train.eval_ks)}"
    student = next((row.get(f"valid/{metric}") for row in state.get("history", []) if row.get("round") == round_),
                   None)
    scores = state["groups"].get("scores")
    teacher = None if scores is None else group_scores_hr(scores, known, config, data, negatives)
    return {"metric": metric, "teacher": teacher, "student": student}


def planted_groups(config) -> np.ndarray:
    """[U] the generator's taste group of every prepared user (prepared id order)."""
    from pipeline.data.datasets import planted_groups as of_dataset

    try:
        return of_dataset(config.data)
    except ValueError as error:
        raise ValueError(f"{config.name}: {error}") from None


def grouping_rows(specs) -> list[dict]:
    from sklearn.metrics import adjusted_rand_score

    from pipeline.data.datasets import open_dataset

    rows, truths = [], {}
    for spec in specs:
        found = run_grouping(spec.run_dir)
        if found is None:
            rows.append({"key": spec.key, "seed": spec.seed, "missing": True})
            continue
        round_, known, state = found
        data_key = spec.config.data.model_dump_json()
        if data_key not in truths:
            truth = planted_groups(spec.config) if spec.config.data.generated else None
            truths[data_key] = (truth, *open_dataset(spec.config.data))
        truth, data, negatives = truths[data_key]
        grouped = known >= 0
        rows.append({"key": spec.key, "seed": spec.seed, "round": round_, "users": int(grouped.sum()),
                     "ari": None if truth is None else float(adjusted_rand_score(truth[grouped], known[grouped])),
                     "sizes": np.bincount(known[grouped]).tolist(),
                     **teacher_against_student(spec.config, state, round_, known, data, negatives)})
    return rows


def markdown(rows: list[dict], command: str) -> str:
    lines = [f"<!-- made by: {command} -->",
             "# GFMFR: its groups against the planted taste groups (synthetic data), its teacher against its "
             "students", "",
             "Adjusted Rand index between the group every user was last assigned by the server (the run's "
             "latest checkpoint) and the synthetic generator's taste group, over the users ever grouped; "
             "1 = the planted partition exactly, 0 = chance (— : not synthetic data, no planted groups). "
             "Teacher: the grouped users ranked by their "
             "group's teacher scores in that checkpoint (what the next round distils), validation, the run's "
             "protocol; student: the run's own validation metric in that round.", "",
             "| Run | Seed | Checkpoint round | Users grouped | ARI | Group sizes | Teacher valid | Student valid |",
             "|---|---|---|---|---|---|---|---|"]

    def percent(value):
        return "—" if value is None else f"{100 * value:.2f}"

    def ari(value):
        return "—" if value is None else f"{value:.3f}"

    for row in rows:
        if row.get("missing"):
            lines.append(f"| {row['key']} | {row['seed']} | (no checkpoint) | | | | | |")
            continue
        lines.append(f"| {row['key']} | {row['seed']} | {row['round']} | {row['users']} | {ari(row['ari'])} | "
                     f"{', '.join(map(str, row['sizes']))} | {percent(row['teacher'])} ({row['metric'].upper()}) | "
                     f"{percent(row['student'])} |")
    by_key: dict[str, list[dict]] = {}
    for row in rows:
        if not row.get("missing"):
            by_key.setdefault(row["key"], []).append(row)

    def mean(found, name):
        """mean of the runs' known values of `name` (None: none known)."""
        values = [r[name] for r in found if r[name] is not None]
        return float(np.mean(values)) if values else None

    lines += ["", "| Run | ARI, mean over seeds | Teacher valid, mean | Student valid, mean | Seeds |",
              "|---|---|---|---|---|"]
    lines += [f"| {key} | {ari(mean(found, 'ari'))} | {percent(mean(found, 'teacher'))} | "
              f"{percent(mean(found, 'student'))} | {len(found)} |" for key, found in by_key.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from pipeline.report.experiments import expand_configs, plan_runs

    parser = argparse.ArgumentParser(prog="python -m pipeline.report.groups", description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", required=True, metavar="GLOB")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="the experiments command's --set")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="default: $PIPELINE_RUNS/experiments (pipeline/paths.py)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    specs = plan_runs(expand_configs(args.configs), args.seeds, args.set, args.runs_dir)
    specs = [s for s in specs if s.config.model.gfmfr is not None]
    if not specs:
        print("no config with model.gfmfr among --configs", file=sys.stderr)
        return 2
    command = "python -m pipeline.report.groups " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    text = markdown(grouping_rows(specs), command)
    if args.out:
        write_text_atomically(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
