"""`python -m pipeline report <run dirs...> --out DIR`: a Markdown report of trained runs.

For one run or a comparison of several (runs of one config with different seeds form one row,
mean ± std): the results table of the `experiments` command (protocol, K, seeds, encoder, the
dataset's facts and its trivial rankings beside the learned rows), validation curves beside the
training loss, with each seed's selected round and the popularity line (validation.png), and
what a round costs (costs.png: round time, clients/s, bytes up and down). Writes DIR/report.md
(atomically) and the PNGs. Runs are grouped by their folder's name (the experiments command's
<config>/seed-<s> folders by <config>, so its seeds form one row) and named as the tables name
them ("FCF + FedMR").
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from pipeline.config import ExperimentConfig
from pipeline.outputs import OutputKind
from pipeline.report.experiments import RunResult, RunSpec


class NotARun(ValueError):
    """A folder that holds no trained run."""


def read_run(run_dir: Path) -> RunResult:
    """A run directory as the experiments command's RunResult (unfinished runs: status missing)."""
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise NotARun(f"{run_dir}: not a run directory (no config.yaml); pass folders a train job wrote")
    config = ExperimentConfig.model_validate(yaml.safe_load(config_file.read_text()))
    key = run_dir.resolve().parent.name if run_dir.name.startswith("seed-") else run_dir.resolve().name
    spec = RunSpec(source=config_file, key=key, seed=config.train.seed,
                   config=config.model_copy(update={"runtime": config.runtime.model_copy(update={"out": run_dir})}),
                   overrides=())
    summary_file = run_dir / "summary.json"
    if not summary_file.is_file():
        return RunResult(spec=spec, status="missing", error="no summary.json: the run has not finished")
    return RunResult(spec=spec, status="skipped", summary=json.loads(summary_file.read_text()))


def _is_report(folder: Path) -> bool:
    from pipeline.outputs import made_by

    return made_by(Path(folder) / "report.md", "python -m pipeline report")


# what `report --out` may replace: an earlier report of trained runs (pipeline.outputs.check_output)
REPORT_OUTPUT = OutputKind("report", "a report of trained runs", "report.md",
                           frozenset({"report.md", "validation.png", "costs.png"}), _is_report)


def report_runs(run_dirs: list[Path], out_dir: Path, title: str | None = None, command: str = "") -> dict:
    """Write out_dir/report.md, validation.png and costs.png; returns the report dict."""
    from pipeline.data.store import write_text_atomically
    from pipeline.report import plots
    from pipeline.report.tables import build_report

    results = [read_run(Path(d)) for d in run_dirs]
    keys = {}
    for result in results:  # one row per config: seeds of one config are grouped, distinct configs kept apart
        seen = keys.setdefault((result.spec.key, result.spec.seed), result.spec.run_dir)
        if seen != result.spec.run_dir:
            raise NotARun(f"{seen} and {result.spec.run_dir} are the same config and seed: pass one of them")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from pipeline.report.plots import _popularity
    from pipeline.report.tables import display_names

    curves = plots.curves_from_results(results, log=lambda message: None)
    finished = [result for result in results if result.summary is not None]
    names = display_names(finished) if finished else {}
    figures = []
    metric = plots.full_metric(plots.selection_metric(results))
    protocols = {result.spec.config.train.protocol for result in finished}
    references = _popularity(finished, metric) if finished and len(protocols) == 1 else {}
    if plots.plot_validation(curves, out_dir / "validation.png", metric=metric, title=title or "", names=names,
                             best=plots.selected_rounds(results), references=references):
        figures.append((f"validation {plots.metric_label(metric)} over rounds", "validation.png"))
    if plots.plot_costs(curves, out_dir / "costs.png", title="what a round costs", names=names):
        figures.append(("round time, clients per second and bytes per round", "costs.png"))
    report = build_report(results, title=title or "Report of trained runs", command=command, figures=figures)
    write_text_atomically(out_dir / "report.md", report["markdown"] + "\n")
    return {**report, "path": str(out_dir / "report.md"), "figures": [str(out_dir / link) for _, link in figures]}
