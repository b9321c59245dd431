"""Validation curves of the `experiments` and `report` commands: one line per config, metric in %
over rounds, beside a panel of the training loss.

`plot_validation` is pure (labelled per-seed metric rows in, a PNG out); `curves_from_results`
reads the rows from the finished runs' metrics.jsonl (or their records). matplotlib is imported
inside the plotting functions (Agg canvas, no pyplot state), so the rest of the package does
not need it.

What a reader gets at a glance: integer round ticks; a marker on every line (a different shape
per config); a star on the line at each seed's selected (best-validation) round; the popularity
ranking's validation value as a grey reference line where the caller knows it; the training
loss (train/loss, mean over seeds) in a panel beside the validation one where the rows hold it
(records written before December 2026 keep no loss); a legend on every panel; configs named as the tables name them
(`names`, e.g. "FCF + FedMR"), not by their folders.

Lines of configs whose names differ only by a `-fedmr` suffix (before an optional protocol
suffix, e.g. `ku-fcf` / `ku-fcf-fedmr`, `x-fcf-p3` / `x-fcf-fedmr-p3`) share a colour: dashed
for the ID-only config, solid for the one with FedMR. Unpaired configs are solid. When one panel
would repeat colours (more than 10), the figure has one panel per backbone instead.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

from pipeline.report.records import read_metrics  # noqa: F401 - also read as plots.read_metrics

DEFAULT_METRIC = "valid/hr@10"
FEDMR = re.compile(r"^(?P<base>.+)-fedmr(?P<protocol>-p[13])?$")


def full_metric(metric: str) -> str:
    """'hr@50' -> 'valid/hr@50'; a name with a split prefix is kept."""
    return metric if "/" in metric else f"valid/{metric}"


def metric_label(metric: str) -> str:
    """'valid/hr@50' -> 'HR@50'."""
    name, _, k = metric.split("/")[-1].partition("@")
    return f"{name.upper()}@{k}" if k else name.upper()


def seed_series(rows: list[dict], metric: str) -> dict[int, float]:
    """round -> value of one seed's metrics rows (rows without the metric are left out; a
    repeated round keeps its last row)."""
    series = {}
    for row in rows:
        value = row.get(metric)
        if "round" in row and isinstance(value, (int, float)) and not math.isnan(value):
            series[int(row["round"])] = float(value)
    return series


def mean_series(rows_per_seed: list[list[dict]], metric: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """(rounds, mean, min, max) over the seeds that logged `metric` at each round: a seed that
    stopped early (patience) leaves the mean from its last round on, so the line runs to the
    longest seed. Values as logged (fractions)."""
    per_seed = [seed_series(rows, metric) for rows in rows_per_seed]
    if not per_seed:
        return [], [], [], []
    rounds = sorted(set().union(*(set(series) for series in per_seed)))
    values = [[series[r] for series in per_seed if r in series] for r in rounds]
    return (rounds, [sum(v) / len(v) for v in values], [min(v) for v in values], [max(v) for v in values])


def pair_styles(labels: list[str]) -> dict[str, tuple[int, str]]:
    """label -> (colour index, line style): a `-fedmr` config and its ID-only twin share a colour,
    the twin dashed, the FedMR line solid."""
    names = set(labels)
    bases = {}
    for label in labels:
        match = FEDMR.match(label)
        twin = f"{match['base']}{match['protocol'] or ''}" if match else None
        bases[label] = twin if twin in names else label
    colours, styles = {}, {}
    for label in labels:
        colour = colours.setdefault(bases[label], len(colours))
        paired = any(bases[other] == bases[label] for other in labels if other != label)
        styles[label] = (colour, "--" if paired and bases[label] == label else "-")
    return styles


PALETTE = [f"C{i}" for i in range(10)]
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
MAX_MARKERS = 15          # markers per line at most (every k-th round on long runs)
PANEL_SIZE = (4.6, 3.4)   # inches per panel of a multi-panel figure
LOSS = "train/loss"
BEST_LABEL = "selected round (best validation)"


def split_panels(labels: list[str], panel_of: dict[str, str] | None) -> list[tuple[str, list[str]]]:
    """[(panel title, labels in it)]: one untitled panel holding every label, unless one panel would
    repeat colours (more colours by `pair_styles` than PALETTE has) and `panel_of` (label -> panel
    name, e.g. the backbone) spreads the labels over several panels; then one panel per name, in
    first-seen order."""
    colours = {colour for colour, _ in pair_styles(labels).values()}
    names = list(dict.fromkeys(panel_of[label] for label in labels)) if panel_of else []
    if len(colours) <= len(PALETTE) or len(names) < 2:
        return [("", list(labels))]
    return [(name, [label for label in labels if panel_of[label] == name]) for name in names]


def _integer_rounds(axes) -> None:
    """Round axis ticks on whole rounds only."""
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))


def _markevery(n: int) -> int:
    return max(1, math.ceil(n / MAX_MARKERS))


def _draw_curves(axes, curves, metric: str, band: bool, names: dict[str, str] | None = None,
                 best: dict[str, list[int]] | None = None, scale: float = 100.0) -> list[str]:
    """Mean line (and min..max band) per label on one axes, colours and dashes by `pair_styles`, a
    marker shape per label, a star at each of `best[label]`'s rounds; the labels drawn."""
    styles = pair_styles([label for label, _ in curves])
    names = names or {}
    drawn = []
    for index, (label, rows_per_seed) in enumerate(curves):
        rounds, mean, low, high = mean_series(rows_per_seed, metric)
        if not rounds:
            continue
        colour_index, style = styles[label]
        colour = PALETTE[colour_index % len(PALETTE)]
        axes.plot(rounds, [scale * v for v in mean], style, color=colour, linewidth=1.6,
                  label=names.get(label, label), marker=MARKERS[index % len(MARKERS)], markersize=4,
                  markevery=_markevery(len(rounds)))
        if band and len(rows_per_seed) > 1:
            axes.fill_between(rounds, [scale * v for v in low], [scale * v for v in high], color=colour,
                              alpha=0.12, linewidth=0)
        at = dict(zip(rounds, mean))
        stars = [r for r in (best or {}).get(label, ()) if r in at]
        if stars:
            axes.plot(stars, [scale * at[r] for r in stars], linestyle="none", marker="*", markersize=13,
                      color=colour, markeredgecolor="black", markeredgewidth=0.7, zorder=5, gid="best-round")
        drawn.append(label)
    if any((best or {}).get(label) for label in drawn):  # one legend entry for all the stars
        axes.plot([], [], linestyle="none", marker="*", markersize=11, color="white", markeredgecolor="black",
                  label=BEST_LABEL)
    return drawn


def _reference_lines(axes, references: dict[str, float] | None, scale: float = 100.0) -> None:
    """A grey horizontal line per reference (name -> value as a fraction), labelled with its value."""
    for index, (name, value) in enumerate((references or {}).items()):
        axes.axhline(scale * value, color="0.45", linestyle=(0, (4, 2, 1, 2)) if index else ":", linewidth=1.4,
                     label=f"{name} ({scale * value:.2f})", gid="reference")


def _legend(axes, small: bool) -> None:
    axes.legend(fontsize=7 if small else 8, loc="best", framealpha=0.85)


def has_metric(curves, metric: str) -> bool:
    """Whether any seed of any label logged `metric`."""
    return any(mean_series(rows_per_seed, metric)[0] for _, rows_per_seed in curves)


def plot_validation(curves: list[tuple[str, list[list[dict]]]], path, metric: str = DEFAULT_METRIC,
                    dpi: int = 100, **options) -> list[str]:
    """Write validation_figure(curves, metric, **options) to the PNG `path`; the labels drawn."""
    figure, drawn = validation_figure(curves, metric, dpi=dpi, **options)
    _save(figure, path, dpi)
    return drawn


def _save(figure, path, dpi: int) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=dpi)


def validation_figure(curves: list[tuple[str, list[list[dict]]]], metric: str = DEFAULT_METRIC,
                      title: str = "", band: bool = True, figsize=(8, 5), dpi: int = 100,
                      panel_of: dict[str, str] | None = None, names: dict[str, str] | None = None,
                      best: dict[str, list[int]] | None = None, references: dict[str, float] | None = None,
                      loss: bool = True):
    """(matplotlib Figure, labels drawn): the metric (in %) over rounds: per label, the mean over its seeds (and a light
    min..max band over seeds), a star at each round of best[label] (the seeds' selected rounds),
    and a grey line per reference (name -> validation value as a fraction, e.g. the popularity
    ranking's). With `loss` and rows that hold train/loss, a loss panel beside each validation
    panel. With many labels, one panel (pair) per `panel_of` name (`split_panels`), each with
    its own colours and y range, PANEL_SIZE inches each (`figsize` is the size of one panel, or
    of one pair of panels side by side). Legends name the labels by `names` (default: the label
    itself). Returns the labels drawn; labels with no common round are left out."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric = full_metric(metric)
    name = metric_label(metric)
    panels = split_panels([label for label, _ in curves], panel_of)
    with_loss = loss and has_metric(curves, LOSS)
    per_panel = 2 if with_loss else 1
    if with_loss:
        columns = 2
        rows = len(panels)
        if len(panels) > 1:
            figsize = (PANEL_SIZE[0] * 2, PANEL_SIZE[1] * rows + 0.4)
        else:
            figsize = (figsize[0] * 1.6, figsize[1])
    else:
        columns = min(3, len(panels))
        rows = math.ceil(len(panels) / columns)
        if len(panels) > 1:
            figsize = (PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows + 0.4)
    figure = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(figure)
    by_label = dict(curves)
    drawn = set()
    small = len(panels) > 1
    for index, (panel, labels) in enumerate(panels):
        axes = figure.add_subplot(rows, columns, index * per_panel + 1)
        chosen = [(label, by_label[label]) for label in labels]
        panel_drawn = _draw_curves(axes, chosen, metric, band, names, best)
        drawn.update(panel_drawn)
        _reference_lines(axes, references)
        axes.set_xlabel("round")
        axes.set_ylabel(f"validation {name} (%)")
        axes.grid(True, alpha=0.3)
        _integer_rounds(axes)
        if panel:
            axes.set_title(panel, fontsize=10)
        if panel_drawn or references:
            _legend(axes, small)
        if with_loss:
            loss_axes = figure.add_subplot(rows, columns, index * per_panel + 2)
            if _draw_curves(loss_axes, chosen, LOSS, band, names, scale=1.0):
                _legend(loss_axes, small)
            loss_axes.set_xlabel("round")
            loss_axes.set_ylabel("training loss (mean over clients)")
            loss_axes.grid(True, alpha=0.3)
            _integer_rounds(loss_axes)
            loss_axes.set_title(f"{panel}: training loss" if panel else "training loss", fontsize=10)
    heading = title or f"validation {name} over rounds"
    if len(panels) == 1 and not with_loss:
        figure.axes[0].set_title(heading, fontsize=11)
    else:
        figure.suptitle(heading, fontsize=11)
    figure.tight_layout()
    return figure, [label for label, _ in curves if label in drawn]


def protocol_paths(path: Path, protocols: list[str]) -> dict[str, Path]:
    """protocol -> PNG path: `path` itself for one protocol, <stem>_<protocol><suffix> for several."""
    if len(protocols) == 1:
        return {protocols[0]: path}
    return {protocol: path.with_name(f"{path.stem}_{protocol}{path.suffix}") for protocol in protocols}


def selection_metric(results) -> str:
    """The metric the finished runs selected on (the first one found), else DEFAULT_METRIC."""
    for result in results:
        metric = ((result.summary or {}).get("selection") or {}).get("metric")
        if metric:
            return metric
    return DEFAULT_METRIC


def curves_from_results(results, log=None) -> list[tuple[str, list[list[dict]]]]:
    """(config key, [metrics rows per finished seed]) in plan order: a run's metrics.jsonl, or the
    rows of its record; unfinished runs and runs without a metrics.jsonl are skipped with a line
    on `log` (stderr)."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    curves: dict[str, list[list[dict]]] = {}
    for result in results:
        seeds = curves.setdefault(result.spec.key, [])
        if result.summary is None:
            log(f"plot: skipping {result.spec.key} seed {result.spec.seed} ({result.status})")
            continue
        if "metrics" in result.extra:  # read from its record (pipeline/report/records.py)
            seeds.append(result.extra["metrics"])
            continue
        try:
            seeds.append(read_metrics(result.spec.run_dir))
        except OSError as error:
            log(f"plot: skipping {result.spec.key} seed {result.spec.seed} (no metrics.jsonl: {error})")
    for key, seeds in curves.items():
        if not seeds:
            log(f"plot: no finished run of {key}")
    return [(key, seeds) for key, seeds in curves.items() if seeds]


def selected_rounds(results) -> dict[str, list[int]]:
    """config key -> the selected (best-validation) round of each finished seed (summary.json)."""
    best: dict[str, list[int]] = {}
    for result in results:
        selection = (result.summary or {}).get("selection") or {}
        if selection.get("best_round") is not None:
            best.setdefault(result.spec.key, []).append(int(selection["best_round"]))
    return best


COST_PANELS = (("time/round_seconds", "round time (s)", 1.0),
               ("time/clients_per_second", "clients / s", 1.0),
               ("comm/bytes_up", "MB up per round", 1e-6),
               ("comm/bytes_down", "MB down per round", 1e-6))


def plot_costs(curves: list[tuple[str, list[list[dict]]]], path, title: str = "", dpi: int = 100,
               names: dict[str, str] | None = None) -> list[str]:
    """Write costs_figure(curves, title, names) to the PNG `path`; the labels drawn."""
    figure, drawn = costs_figure(curves, title, dpi, names)
    _save(figure, path, dpi)
    return drawn


def costs_figure(curves: list[tuple[str, list[list[dict]]]], title: str = "", dpi: int = 100,
                 names: dict[str, str] | None = None):
    """(Figure, labels drawn): what a round costs, one panel per COST_PANELS metric: per label,
    the mean over its seeds, named by `names`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 7), dpi=dpi)
    FigureCanvasAgg(figure)
    drawn = set()
    for index, (metric, label, scale) in enumerate(COST_PANELS):
        axes = figure.add_subplot(2, 2, index + 1)
        drawn.update(_draw_curves(axes, curves, metric, band=False, names=names, scale=scale))
        if axes.lines:
            _legend(axes, small=True)
        axes.set_xlabel("round")
        axes.set_ylabel(label)
        axes.grid(True, alpha=0.3)
        _integer_rounds(axes)
    figure.suptitle(title or "cost per round", fontsize=11)
    figure.tight_layout()
    return figure, [name for name, _ in curves if name in drawn]


# -- redrawing a results plot from its run records ---------------------------------------------------


def results_from_records(records_dir, overrides: list[str] = ()) -> list:
    """Every record under `records_dir` (<key>/seed-<s>.json) as a finished RunResult (status
    'recorded'), its config read from the record's own summary through the current schema, with
    `overrides` ('data.protocol.min_user=0') set on it; in the tables' backbone order, then by
    key and seed. RecordError names a file that is not a record or whose config no longer reads."""
    import copy

    import yaml

    from pipeline.config import ExperimentConfig, set_dotted
    from pipeline.report.experiments import RunResult, RunSpec
    from pipeline.report.records import RecordError, read_record
    from pipeline.report.tables import BACKBONE_NAMES

    found = []
    for path in sorted(Path(records_dir).glob("*/seed-*.json")):
        key, seed = path.parent.name, path.stem.removeprefix("seed-")
        if not seed.isdigit():
            continue
        record = read_record(records_dir, key, int(seed))
        try:
            tree = copy.deepcopy(record["summary"]["config"])
            for item in overrides:
                dotted, _, raw = item.partition("=")
                set_dotted(tree, dotted.strip(), yaml.safe_load(raw))
            config = ExperimentConfig.model_validate(tree)
        except (KeyError, TypeError, ValueError) as error:
            raise RecordError(f"{path}: its config does not read as an experiment config any more "
                              f"({str(error).splitlines()[0]})") from None
        spec = RunSpec(source=path, key=key, seed=int(seed), config=config, overrides=())
        found.append(RunResult(spec, "recorded", summary=record["summary"], extra={"metrics": record["metrics"]}))
    if not found:
        raise FileNotFoundError(f"{records_dir}: no run record (<config>/seed-<s>.json) here")
    order = list(BACKBONE_NAMES)

    def rank(result):
        backbone = result.spec.config.model.backbone
        return (order.index(backbone) if backbone in order else len(order), result.spec.key, result.spec.seed)

    return sorted(found, key=rank)


def draw_results(args, results) -> list[tuple[str, str]]:
    """Draw --plot; the report's figure lines (alt text, path relative to the report's folder).
    Runs under several protocols get one PNG per protocol (<stem>_<protocol>.png), each on that
    protocol's selection metric. Too many configs for one panel's colours: one panel per backbone.
    Legends use the tables' names; each seed's selected round is starred; the popularity ranking's
    validation value is a reference line (computed here on the prepared split the runs used)."""
    import os

    from pipeline.report.tables import BACKBONE_NAMES, DEFAULT_TITLE, display_names

    by_protocol: dict[str, list] = {}
    for result in results:
        if getattr(result.spec, "centralized", False):  # epochs of pooled training are not rounds: not on this axis
            continue
        by_protocol.setdefault(result.spec.config.train.protocol, []).append(result)
    paths = protocol_paths(Path(args.plot), sorted(by_protocol))
    lines = []
    for protocol, path in paths.items():
        group = by_protocol[protocol]
        chosen = getattr(args, "plot_metric", None) or group[0].spec.config.train.selection()
        metric = full_metric(chosen)
        curves = curves_from_results(group)
        title = (args.title or DEFAULT_TITLE) + (f" ({protocol.upper()})" if len(paths) > 1 else "")
        backbone_of = {result.spec.key: BACKBONE_NAMES[result.spec.config.model.backbone] for result in group}
        drawn = plot_validation(curves, path, metric=metric, title=title, panel_of=backbone_of,
                                      names=display_names(group), best=selected_rounds(group),
                                      references=_popularity(group, metric))
        if curves and not has_metric(curves, LOSS):
            print(f"plot: no {LOSS} in the runs' rows (run records written before December 2026 keep none): {path} has no loss panel",
                  file=sys.stderr)
        for label, _ in curves:
            if label not in drawn:
                print(f"plot: {label}: no finished seed logged {metric}", file=sys.stderr)
        if not drawn:
            print(f"plot: nothing to draw; {path} holds empty axes and the report does not link it", file=sys.stderr)
            continue
        report_dir = Path(args.out).resolve().parent if args.out else Path.cwd()
        link = Path(os.path.relpath(Path(path).resolve(), report_dir)).as_posix()
        lines.append((f"validation {metric_label(metric)} over rounds"
                      + (f", {protocol.upper()}" if len(paths) > 1 else ""), link))
    return lines


def _popularity(results, metric: str) -> dict[str, float]:
    """The popularity line of a plot of `results` (one dataset preparation and protocol), or none
    with a line on stderr when the data cannot be prepared here or the runs used several."""
    from pipeline.report.tables import popularity_reference

    datasets = {result.spec.config.data.model_dump_json() for result in results}
    fingerprints = {((result.summary or {}).get("dataset") or {}).get("fingerprint") for result in results} - {None}
    if len(datasets) != 1 or len(fingerprints) > 1:
        print("plot: the runs used several datasets or preparations: no popularity line", file=sys.stderr)
        return {}
    try:
        return popularity_reference(results[0].spec.config, metric, next(iter(fingerprints), None))
    except Exception as error:  # the curves are drawn all the same
        print(f"plot: no popularity line ({type(error).__name__}: {error})", file=sys.stderr)
        return {}


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.report.plots --records DIR --out PNG`: redraw the validation plot of
    a results table from its committed run records alone (no run directory, no training)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline.report.plots", description=main.__doc__)
    parser.add_argument("--records", type=Path, required=True, help="a table's records folder "
                                                                     "(results/records/<table>)")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write (one per protocol: "
                                                                 "<stem>_<protocol>.png when the runs have several)")
    parser.add_argument("--title", default=None, help="the plot's title (the table's)")
    parser.add_argument("--metric", default=None, help="validation metric (default: the runs' selection metric)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="set on every record's config before it is read through today's schema, for keys "
                             "added since the runs whose defaults differ from what the runs had, e.g. "
                             "data.protocol.min_user=0: the popularity line is drawn only when the data the "
                             "config prepares has the runs' fingerprint")
    args = parser.parse_args(argv)
    from pipeline.report.records import RecordError

    try:
        results = results_from_records(args.records, args.set)
    except (FileNotFoundError, RecordError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    plot_args = argparse.Namespace(plot=args.out, plot_metric=args.metric, out=None, title=args.title)
    figures = draw_results(plot_args, results)
    print(f"{len(results)} records of {len({r.spec.key for r in results})} configs; wrote "
          + (", ".join(link for _, link in figures) or "nothing"), file=sys.stderr)
    return 0 if figures else 1


if __name__ == "__main__":
    sys.exit(main())
