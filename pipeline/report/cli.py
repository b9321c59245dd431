"""`experiments`: run configs over seeds (resumable) and write the results table.

    python -m pipeline experiments --configs 'configs/ku/*.yaml' --seeds 0 1 2 \
        --set runtime.pools=2 --out results/ku_backbones.md

Until the subcommand is wired into pipeline/cli.py, `python -m pipeline.report.cli ...`
runs the same thing (the arguments of `experiments`, without the command word).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from pipeline.data.store import write_text_atomically
from pipeline.report.experiments import (DEFAULT_SEEDS, MODES, expand_configs, plan_runs,
                                        run_experiments)


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--configs", nargs="+", required=True, metavar="GLOB",
                        help="experiment YAML files or globs (quote them), e.g. 'configs/ku/*.yaml'")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS),
                        help="run seeds; each sets train.seed and train.model_seed (default 0 1 2)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides applied to every config, e.g. runtime.pools=2 train.protocol=p3")
    parser.add_argument("--protocol", nargs="+", choices=["p1", "p3"], default=None,
                        help="run every config under each of these protocols (default: each config's own); "
                             "a run under another protocol than its file's goes to <config name>-<protocol>")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="run directories go to RUNS_DIR/<config name>/seed-<s> (default: the runs root's "
                             "experiments/, $PIPELINE_RUNS or ~/.local/share/fedmm-pipeline/runs)")
    parser.add_argument("--shared-runs", action="store_true",
                        help="with --protocol A B: train each (config, seed) once, under A, evaluating B too "
                             "(train.also_protocols); B's rows are read from those runs, which give exactly what "
                             "runs under B would (a run under A without B's evaluation, e.g. from before, leaves "
                             "B's run to be trained)")
    parser.add_argument("--records", type=Path, default=None, metavar="DIR",
                        help="keep a small record of every finished run in DIR/<config name>/seed-<s>.json "
                             "(summary and per-round validation, test, time and traffic metrics; commit it beside "
                             "the table) and read a run from its record when it is not finished on disk: "
                             "the table can be completed on another machine and rebuilt from the records alone")
    parser.add_argument("--accept-reencoded-features", action="store_true",
                        help="count finished runs (on disk or recorded) whose item features differ from today's "
                             "only because the same feature store (the same encoders, settings and inputs) was "
                             "encoded again, e.g. on another machine whose float kernels round differently; the "
                             "report names each such run and both features fingerprints (without this flag "
                             "they are stale)")
    parser.add_argument("--mode", choices=list(MODES), default="federated",
                        help="federated runs, the configs' centralized upper bounds (pipeline centralized; rows "
                             "labelled 'centralized'), or both in the same tables with the gap per backbone")
    parser.add_argument("--out", type=Path, help="write the Markdown report here")
    parser.add_argument("--title", default=None, help="report title")
    parser.add_argument("--note", action="append", default=[], metavar="TEXT",
                        help="a line for the report's notes (repeatable), e.g. why rounds were reduced")
    parser.add_argument("--force", action="store_true", help="re-run runs that already have a summary.json")
    parser.add_argument("--report-only", action="store_true",
                        help="start no run: tabulate the finished runs, list the missing ones")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the Markdown")
    parser.add_argument("--plot", type=Path, metavar="PATH",
                        help="also draw validation curves (one line per config: mean over seeds, min..max band) "
                             "to this PNG, one panel per backbone when one panel would repeat colours; "
                             "the report links it")
    parser.add_argument("--plot-metric", default=None, metavar="METRIC",
                        help="metric of --plot, e.g. valid/hr@10 or hr@50 "
                             "(default: the runs' selection metric, else valid/hr@10)")


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed, for the report's header, less --report-only: the same command
    without it makes the missing runs and writes the same report from finished ones."""
    argv = sys.argv if argv is None else argv
    prog = "python -m pipeline.report.cli" if argv and argv[0].endswith(("report/cli.py", "report\\cli.py")) \
        else "python -m pipeline"
    return " ".join([prog, *(shlex.quote(arg) for arg in argv[1:] if arg != "--report-only")])


def _plot(args, results) -> list[tuple[str, str]]:
    """Draw --plot (plots.draw_results); the report's figure lines."""
    from pipeline.report.plots import draw_results

    return draw_results(args, results)


def cmd_experiments(args) -> int:
    from pipeline.report.tables import build_report

    from pipeline.outputs import check_report_file

    started = time.perf_counter()
    paths = expand_configs(args.configs)
    if args.out:  # before any run starts
        check_report_file(args.out, "experiments", programs=["python -m pipeline.report.cli"], inputs=paths)
    specs = []
    protocols = args.protocol or [None]
    shared = getattr(args, "shared_runs", False)
    if shared and len(protocols) < 2:
        raise ValueError("--shared-runs: name two protocols (--protocol p1 p3): the runs of the first also "
                         "evaluate the second")
    for position, protocol in enumerate(protocols):
        also = [f"train.also_protocols=[{','.join(protocols[1:])}]"] if shared and position == 0 else []
        overrides = [*(args.set or []), *([f"train.protocol={protocol}"] if protocol else []), *also]
        specs += plan_runs(paths, seeds=args.seeds, overrides=overrides, runs_dir=args.runs_dir,
                           mode=getattr(args, "mode", "federated"),
                           accept_reencoded=getattr(args, "accept_reencoded_features", False))
    if args.force and args.report_only:
        raise ValueError("--force and --report-only contradict each other")
    results = run_experiments(specs, force=args.force, report_only=args.report_only,
                              records_dir=getattr(args, "records", None))
    figures = _plot(args, results) if getattr(args, "plot", None) else []
    report = build_report(results, title=args.title, command=getattr(args, "command_line", None) or command_line(), overrides=args.set or [],
                          seeds=args.seeds, extra_notes=args.note, figures=figures)
    markdown = report["markdown"]
    if args.out:
        write_text_atomically(Path(args.out), markdown + "\n")
    if args.json:
        print(json.dumps({key: value for key, value in report.items() if key != "markdown"}, indent=2, default=str))
    else:
        print(markdown)
    failed = [r for r in results if r.status == "failed"]
    print(f"{len(results)} runs: " + ", ".join(f"{sum(r.status == s for r in results)} {s}"
                                                for s in ("ran", "resumed", "skipped", "recorded", "derived",
                                                          "missing", "failed"))
          + f"; {time.perf_counter() - started:.0f} s" + (f"; report: {args.out}" if args.out else "")
          + (f"; plot: {', '.join(link for _, link in figures)}" if figures else ""),
          file=sys.stderr)
    return 1 if failed else 0


def register(commands) -> argparse.ArgumentParser:
    """Add the `experiments` subcommand to an argparse subparsers object."""
    parser = commands.add_parser("experiments", help="run configs over seeds and write the results table (mean ± std)")
    _add_args(parser)
    parser.set_defaults(func=cmd_experiments)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.report.cli",
                                     description="the `experiments` command: " + (__doc__ or "").splitlines()[0])
    _add_args(parser)
    args = parser.parse_args(argv)
    args.command_line = command_line(["pipeline/report/cli.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        return cmd_experiments(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
