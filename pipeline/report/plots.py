"""Validation curves of the `experiments` command: one line per config, metric in % over rounds.

`plot_validation` is pure (labelled per-seed metric rows in, a PNG out); `curves_from_results`
reads the rows from the finished runs' metrics.jsonl. matplotlib is imported inside the plotting
function (Agg canvas, no pyplot state), so the rest of the package does not need it.

Lines of configs whose names differ only by a `-fedmr` suffix (before an optional protocol
suffix, e.g. `ku-fcf` / `ku-fcf-fedmr`, `x-fcf-p3` / `x-fcf-fedmr-p3`) share a colour: dashed
for the ID-only config, solid for the one with FedMR. Unpaired configs are solid. When one panel
would repeat colours (more than 10), the figure has one panel per backbone instead.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

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
PANEL_SIZE = (4.6, 3.4)   # inches per panel of a multi-panel figure


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


def _draw_curves(axes, curves, metric: str, band: bool) -> list[str]:
    """Mean line (and min..max band) per label on one axes, colours by `pair_styles`; the labels drawn."""
    styles = pair_styles([label for label, _ in curves])
    drawn = []
    for label, rows_per_seed in curves:
        rounds, mean, low, high = mean_series(rows_per_seed, metric)
        if not rounds:
            continue
        colour_index, style = styles[label]
        colour = PALETTE[colour_index % len(PALETTE)]
        axes.plot(rounds, [100 * v for v in mean], style, color=colour, linewidth=1.6, label=label,
                  marker="o" if len(rounds) == 1 else None)
        if band and len(rows_per_seed) > 1:
            axes.fill_between(rounds, [100 * v for v in low], [100 * v for v in high], color=colour,
                              alpha=0.12, linewidth=0)
        drawn.append(label)
    return drawn


def plot_validation(curves: list[tuple[str, list[list[dict]]]], path, metric: str = DEFAULT_METRIC,
                    title: str = "", band: bool = True, figsize=(8, 5), dpi: int = 100,
                    panel_of: dict[str, str] | None = None) -> list[str]:
    """Write a PNG of the metric (in %) over rounds: per label, the mean over its seeds (and a light
    min..max band over seeds). With many labels, one panel per `panel_of` name (`split_panels`),
    each with its own colours and y range, PANEL_SIZE inches each (`figsize` is the one-panel
    size). Returns the labels drawn; labels with no common round
    are left out."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric = full_metric(metric)
    name = metric_label(metric)
    panels = split_panels([label for label, _ in curves], panel_of)
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    if len(panels) > 1:
        figsize = (PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows + 0.4)
    figure = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(figure)
    by_label = dict(curves)
    drawn = set()
    for index, (panel, labels) in enumerate(panels):
        axes = figure.add_subplot(rows, columns, index + 1)
        panel_drawn = _draw_curves(axes, [(label, by_label[label]) for label in labels], metric, band)
        drawn.update(panel_drawn)
        axes.set_xlabel("round")
        axes.set_ylabel(f"validation {name} (%)")
        axes.grid(True, alpha=0.3)
        if panel:
            axes.set_title(panel, fontsize=10)
        if panel_drawn:
            axes.legend(fontsize=8 if len(panels) == 1 else 7, loc="best")
    heading = title or f"validation {name} over rounds"
    if len(panels) == 1:
        figure.axes[0].set_title(heading, fontsize=11)
    else:
        figure.suptitle(heading, fontsize=11)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=dpi)
    return [label for label, _ in curves if label in drawn]


def protocol_paths(path: Path, protocols: list[str]) -> dict[str, Path]:
    """protocol -> PNG path: `path` itself for one protocol, <stem>_<protocol><suffix> for several."""
    if len(protocols) == 1:
        return {protocols[0]: path}
    return {protocol: path.with_name(f"{path.stem}_{protocol}{path.suffix}") for protocol in protocols}


def read_metrics(run_dir) -> list[dict]:
    """The rows of a run's metrics.jsonl (a torn last line is ignored)."""
    rows = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


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


COST_PANELS = (("time/round_seconds", "round time (s)", 1.0),
               ("time/clients_per_second", "clients / s", 1.0),
               ("comm/bytes_up", "MB up per round", 1e-6),
               ("comm/bytes_down", "MB down per round", 1e-6))


def plot_costs(curves: list[tuple[str, list[list[dict]]]], path, title: str = "", dpi: int = 100) -> list[str]:
    """Write a PNG of what a round costs, one panel per COST_PANELS metric: per label, the mean
    over its seeds. Returns the labels drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 7), dpi=dpi)
    FigureCanvasAgg(figure)
    styles = pair_styles([label for label, _ in curves])
    drawn = set()
    for index, (metric, label, scale) in enumerate(COST_PANELS):
        axes = figure.add_subplot(2, 2, index + 1)
        for name, rows_per_seed in curves:
            rounds, mean, _, _ = mean_series(rows_per_seed, metric)
            if not rounds:
                continue
            colour, style = styles[name]
            axes.plot(rounds, [scale * v for v in mean], style, color=PALETTE[colour % len(PALETTE)], linewidth=1.4, label=name,
                      marker="o" if len(rounds) == 1 else None)
            drawn.add(name)
        axes.set_xlabel("round")
        axes.set_ylabel(label)
        axes.grid(True, alpha=0.3)
        if index == 0 and drawn:
            axes.legend(fontsize=7, loc="best")
    figure.suptitle(title or "cost per round", fontsize=11)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=dpi)
    return [name for name, _ in curves if name in drawn]
