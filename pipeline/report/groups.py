"""How well GFMFR's grouping in finished runs matches the synthetic generator's planted taste groups.

    python -m pipeline.report.groups --configs 'configs/synthetic_groups/*gfmfr.yaml' --seeds 0 1 2 \
        --out results/synthetic_groups_grouping.md

For every (config, seed) with `model.gfmfr` on the synthetic dataset, read from the run's latest
checkpoint (the experiments command's run folders, runs/experiments/<name>/seed-<s>) the group
every user was last assigned (the server's aligned ids), and compare it with the generator's
`user_group` (regenerated from the config: the data are a pure function of it) by the adjusted
Rand index (scikit-learn), over the users that were ever grouped.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np

from pipeline.data.store import write_text_atomically
from pipeline.federated.checkpoints import newest_intact


def run_grouping(run_dir: Path) -> tuple[int, np.ndarray] | None:
    """(round, [U] latest group id of every user, -1 never grouped) of a run's latest complete
    checkpoint, or None without one."""
    import torch

    checkpoint, _ = newest_intact(run_dir / "checkpoints")
    if checkpoint is None:
        return None
    state = torch.load(checkpoint / "global.pt", weights_only=False)
    if state.get("groups") is None:
        raise ValueError(f"{checkpoint}: not a GFMFR run (no group state)")
    return int(checkpoint.name.split("-")[1]), np.asarray(state["groups"]["known"])


def planted_groups(config) -> np.ndarray:
    """[U] the generator's taste group of every prepared user (prepared id order)."""
    from pipeline.data.datasets import planted_groups as of_dataset

    try:
        return of_dataset(config.data)
    except ValueError as error:
        raise ValueError(f"{config.name}: {error}") from None


def grouping_rows(specs) -> list[dict]:
    from sklearn.metrics import adjusted_rand_score

    rows, truths = [], {}
    for spec in specs:
        found = run_grouping(spec.run_dir)
        if found is None:
            rows.append({"key": spec.key, "seed": spec.seed, "missing": True})
            continue
        round_, known = found
        data_key = spec.config.data.model_dump_json()
        if data_key not in truths:
            truths[data_key] = planted_groups(spec.config)
        truth = truths[data_key]
        grouped = known >= 0
        rows.append({"key": spec.key, "seed": spec.seed, "round": round_, "users": int(grouped.sum()),
                     "ari": float(adjusted_rand_score(truth[grouped], known[grouped])),
                     "sizes": np.bincount(known[grouped]).tolist()})
    return rows


def markdown(rows: list[dict], command: str) -> str:
    lines = [f"<!-- made by: {command} -->", "# GFMFR's groups against the planted taste groups", "",
             "Adjusted Rand index between the group every user was last assigned by the server (the run's "
             "latest checkpoint) and the synthetic generator's taste group, over the users ever grouped; "
             "1 = the planted partition exactly, 0 = chance.", "",
             "| Run | Seed | Checkpoint round | Users grouped | ARI | Group sizes |", "|---|---|---|---|---|---|"]
    for row in rows:
        if row.get("missing"):
            lines.append(f"| {row['key']} | {row['seed']} | (no checkpoint) | | | |")
            continue
        lines.append(f"| {row['key']} | {row['seed']} | {row['round']} | {row['users']} | {row['ari']:.3f} | "
                     f"{', '.join(map(str, row['sizes']))} |")
    by_key: dict[str, list[float]] = {}
    for row in rows:
        if not row.get("missing"):
            by_key.setdefault(row["key"], []).append(row["ari"])
    lines += ["", "| Run | ARI, mean over seeds | Seeds |", "|---|---|---|"]
    lines += [f"| {key} | {np.mean(values):.3f} | {len(values)} |" for key, values in by_key.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from pipeline.report.experiments import DEFAULT_RUNS_DIR, expand_configs, plan_runs

    parser = argparse.ArgumentParser(prog="python -m pipeline.report.groups", description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", required=True, metavar="GLOB")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="the experiments command's --set")
    parser.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR)
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
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
