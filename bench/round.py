"""Benchmark: the round as `pipeline train` runs it, per phase, from command to exit.

    python -m bench.round --dataset ku --method id                  # KU FCF, 5 rounds, 3 runs
    python -m bench.round --dataset ku --method id --baseline-set runtime.backend=ray   # against Ray
    python -m bench.round --dataset movielens --method fedmr         # FedRAP + FedMR on ML-100K
    python -m bench.round --dataset movielens --method fedmr --set runtime.precision=bf16
    python -m bench.round --dataset ku --method id --baseline HEAD~3 # against an earlier commit
    python -m bench.round --quick                                    # synthetic FCF, 3 rounds, 1 run
    python -m bench.round --dataset ku --set runtime.backend=ray --address 127.0.0.1:6399 \
        --baseline-set runtime.backend=ray                            # joining a running head vs a new instance

Each run is the real command, `python -m pipeline train --config configs/<dataset>/<backbone>
[_fedmr|_gfmfr|_fedmr_gfmfr].yaml --json`, in a subprocess, on the config's runtime.backend: on
Ray (MovieLens, synthetic) a local Ray instance, the Server actor, the ClientPool actors, the round
loop with its evaluation schedule, GFMFR's group step and checkpoints, then Ray's shutdown; in
the command's own process (KU: runtime.backend: local) the same round loop without Ray. From its
metrics.jsonl and summary.json (and the clock around the process) it reports:

  start-up   imports (process start to the job's start), data (open and check the prepared
             data), ray (start a local instance), server (the Server actor up), first round (the
             pools' start-up and round 0), shutdown (summary written to process exit), total
             (command to exit)
  per round  round_s: the median over rounds after round 0 of time/round_seconds (local
             training + aggregation + GFMFR's group step + evaluation, checkpoints apart), and
             its parts train_s, group_s (GFMFR's server step) and eval_s

The baseline runs in the same invocation, alternating with the measured side run by run (the
machine is shared and its speed drifts): `--baseline REF` runs the same command in a git
worktree of commit REF; `--baseline-set KEY=VALUE ...` runs this tree with other overrides (e.g.
runtime.precision=fp32 against --set runtime.precision=bf16). Without either, no ratio. The last
line printed is one JSON object: round_s, total_s, their baseline_* twins and ratios
(baseline / measured: above 1 = faster), and every phase.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench._common import emit_json
from pipeline.data.datasets import data_root

ROOT = Path(__file__).resolve().parents[1]
SUFFIX = {"id": "", "fedmr": "_fedmr", "gfmfr": "_gfmfr", "both": "_fedmr_gfmfr"}
DEFAULT_BACKBONE = {"ku": "fcf", "movielens": "fedrap", "synthetic": "fcf"}
STARTUP = ("imports_s", "data_s", "ray_s", "server_s", "first_round_s", "shutdown_s", "total_s")
PER_ROUND = ("round_s", "train_s", "group_s", "eval_s")


def config_path(dataset: str, backbone: str, method: str) -> Path:
    return ROOT / "configs" / dataset / f"{backbone}{SUFFIX[method]}.yaml"


def absolute_paths(config: Path) -> list[str]:
    """--set overrides that pin the config's relative data paths to this checkout, so that a
    baseline worktree reads the same data and feature store."""
    tree = yaml.safe_load(config.read_text()) or {}
    data = tree.get("data") or {}
    return [f"data.{key}={(ROOT / data[key]).resolve()}" for key in ("path", "features")
            if data.get(key) and not Path(data[key]).is_absolute()]


def run_once(tree: Path, config: Path, overrides: list[str], rounds: int, out: Path,
             address: str | None = None) -> dict:
    """One `pipeline train` from command to exit in `tree`; its phases in seconds."""
    command = [sys.executable, "-m", "pipeline", "train", "--config", str(config), "--json", "--set",
               f"train.rounds={rounds}", f"runtime.out={out}", "runtime.progress=false", "train.patience=1000",
               *absolute_paths(config), *overrides, *(["--address", address] if address else [])]
    # the named datasets of this checkout's data root, whichever tree runs (a baseline worktree
    # elsewhere has no ../shared beside it)
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "PIPELINE_DATA_ROOT": str(data_root())}
    spawned = time.time()
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    exited = time.time()
    if done.returncode != 0:
        raise SystemExit(f"bench.round: {' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    later = [row for row in rows if row["round"] > 0] or rows

    def median(key: str) -> float:
        return statistics.median(row.get(key, 0.0) for row in later)

    figures = {"total_s": exited - spawned, "round_s": median("time/round_seconds"),
               "train_s": median("time/train_seconds"), "eval_s": median("time/eval_seconds"),
               "group_s": median("time/group_step_seconds"), "rounds": len(rows)}
    phases = summary.get("timing", {}).get("startup_phases")  # None before the job recorded them
    if phases:
        figures.update({key: phases[key] for key in ("data_s", "ray_s", "server_s", "first_round_s") if key in phases})
        figures["imports_s"] = phases["started_at"] - spawned
    if summary.get("finished_at"):
        figures["shutdown_s"] = exited - summary["finished_at"]
    return figures


def medians(runs: list[dict]) -> dict:
    keys = {key for run in runs for key in run}
    return {key: statistics.median(run[key] for run in runs if key in run) for key in sorted(keys)}


def show(label: str, figures: dict) -> None:
    start = "  ".join(f"{key[:-2]} {figures[key]:.2f}" for key in STARTUP if key in figures)
    per_round = "  ".join(f"{key[:-2]} {figures[key] * 1000:.1f} ms" for key in PER_ROUND if key in figures)
    print(f"{label}: start-up (s): {start}\n{' ' * len(label)}  per round after round 0 (median): {per_round}",
          flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(DEFAULT_BACKBONE), default="ku")
    parser.add_argument("--method", choices=sorted(SUFFIX), default="id")
    parser.add_argument("--backbone", default=None, help="default: fcf on KU and synthetic, fedrap on MovieLens")
    parser.add_argument("--rounds", type=int, default=None, help="default 5 (--quick: 3)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating")
    parser.add_argument("--device", default=None, help="runtime.device (default: the config's)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the measured side")
    parser.add_argument("--baseline", metavar="REF", help="a git commit to run the same command at, as the baseline")
    parser.add_argument("--baseline-set", nargs="*", default=None, metavar="KEY=VALUE",
                        help="the baseline: this tree with these overrides instead of --set")
    parser.add_argument("--address", default=None,
                        help="a running Ray cluster the measured side's runs join (e.g. after `ray start "
                             "--head`) instead of each starting its own instance; the baseline's runs do not")
    parser.add_argument("--quick", action="store_true", help="synthetic FCF, 3 rounds, 1 run per side")
    args = parser.parse_args(argv)
    if args.quick:
        args.dataset, args.repeats = "synthetic", 1
    args.rounds = args.rounds or (3 if args.quick else 5)
    backbone = args.backbone or DEFAULT_BACKBONE[args.dataset]
    config = config_path(args.dataset, backbone, args.method)
    if not config.is_file():
        parser.error(f"no config {config.relative_to(ROOT)}")
    device = [f"runtime.device={args.device}"] if args.device else []
    measured = [*device, *args.set]
    print(f"bench.round: {config.relative_to(ROOT)}, {args.rounds} rounds, {args.repeats} run(s) per side; "
          f"overrides {measured or 'none'}; load average {os.getloadavg()[0]:.2f}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-round-") as scratch:
        scratch = Path(scratch)
        sides = [("measured", ROOT, measured)]
        if args.baseline:
            worktree = scratch / "baseline"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(worktree), args.baseline],
                           check=True, capture_output=True)
            sides.append((f"baseline ({args.baseline})", worktree, [*device, *(args.baseline_set or [])]))
        elif args.baseline_set is not None:
            sides.append((f"baseline ({' '.join(args.baseline_set) or 'config'})", ROOT, [*device, *args.baseline_set]))
        try:
            runs: dict[str, list[dict]] = {label: [] for label, _, _ in sides}
            for repeat in range(args.repeats):
                for label, tree, overrides in (sides if repeat % 2 == 0 else sides[::-1]):
                    out = scratch / f"{label.split()[0]}-{repeat}"
                    figures = run_once(tree, config, overrides, args.rounds, out,
                                       args.address if label == "measured" else None)
                    runs[label].append(figures)
                    show(f"{label} run {repeat + 1}", figures)
        finally:
            if args.baseline:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(scratch / "baseline")],
                               capture_output=True)

    result = {"bench": "round", "dataset": args.dataset, "method": args.method, "backbone": backbone,
              "device": args.device or "config", "rounds": args.rounds, "repeats": args.repeats,
              "address": args.address,
              "overrides": measured, **medians(runs["measured"])}
    show("measured (median)", result)
    if len(sides) == 2:
        baseline = medians(runs[sides[1][0]])
        show("baseline (median)", baseline)
        result.update({f"baseline_{key}": value for key, value in baseline.items()})
        result["baseline"] = sides[1][0]
        result["ratio"] = baseline["round_s"] / result["round_s"]
        result["total_ratio"] = baseline["total_s"] / result["total_s"]
        print(f"round: {result['round_s'] * 1000:.1f} ms against {baseline['round_s'] * 1000:.1f} ms "
              f"(x{result['ratio']:.2f}); command to exit: {result['total_s']:.1f} s against "
              f"{baseline['total_s']:.1f} s (x{result['total_ratio']:.2f})", flush=True)
    emit_json(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
