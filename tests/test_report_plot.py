"""`experiments --plot`: validation curves over rounds (pipeline/report/plots.py) and the CLI option."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from pipeline.report import plots

METRIC = "valid/hr@50"


def _rows(values, metric=METRIC, start=0):
    """metrics.jsonl rows as the train job writes them (a few of the real keys)."""
    return [{"round": start + i, "train/loss": 0.3 - 0.01 * i, "valid/hr@10": v / 2, metric: v,
             "test/hr@50": v / 3, "improved": i == 0, "stop": False} for i, v in enumerate(values)]


def _assert_png(path: Path):
    assert path.is_file() and 0 < path.stat().st_size < 200_000
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:
        assert image.size == (800, 500)          # 8x5 inches at dpi 100


def test_mean_series_over_the_seeds_that_reached_each_round():
    seeds = [_rows([0.1, 0.2, 0.3, 0.4]), _rows([0.3, 0.4]), _rows([0.2, 0.6, 0.9])]
    rounds, mean, low, high = plots.mean_series(seeds, METRIC)
    assert rounds == [0, 1, 2, 3]
    assert mean == pytest.approx([0.2, 0.4, 0.6, 0.4])
    assert low == pytest.approx([0.1, 0.2, 0.3, 0.4]) and high == pytest.approx([0.3, 0.6, 0.9, 0.4])
    # rows without the metric (rounds not evaluated) are left out; a single seed is its own mean
    sparse = [{"round": 0, METRIC: 0.5}, {"round": 1, "train/loss": 0.2}, {"round": 2, METRIC: 0.7}]
    assert plots.mean_series([sparse], METRIC) == ([0, 2], [0.5, 0.7], [0.5, 0.7], [0.5, 0.7])
    assert plots.mean_series([], METRIC) == ([], [], [], [])


def test_pair_styles_share_colour_dashed_id_only():
    styles = plots.pair_styles(["ku-fcf", "ku-fedavg", "ku-fcf-fedmr", "ku-fedrap-fedmr", "x-fcf-p3", "x-fcf-fedmr-p3"])
    assert styles["ku-fcf"][0] == styles["ku-fcf-fedmr"][0]
    assert styles["ku-fcf"][1] == "--" and styles["ku-fcf-fedmr"][1] == "-"
    assert styles["x-fcf-p3"][0] == styles["x-fcf-fedmr-p3"][0] and styles["x-fcf-p3"][1] == "--"
    assert styles["ku-fedavg"][1] == "-" and styles["ku-fedrap-fedmr"][1] == "-"   # unpaired: solid
    colours = {styles[k][0] for k in ("ku-fcf", "ku-fedavg", "ku-fedrap-fedmr", "x-fcf-p3")}
    assert len(colours) == 4


def test_plot_validation_writes_a_small_png(tmp_path):
    curves = [("ku-fcf", [_rows([0.30, 0.35, 0.36]), _rows([0.32, 0.33])]),
              ("ku-fcf-fedmr", [_rows([0.40, 0.45, 0.50]), _rows([0.41, 0.47, 0.52])]),
              ("ku-fedavg", [_rows([0.05, 0.06, 0.07, 0.08])]),
              ("ku-empty", [[{"round": 0, "train/loss": 1.0}]])]
    out = tmp_path / "figs" / "valid.png"
    drawn = plots.plot_validation(curves, out, metric="hr@50", title="KU: validation")
    assert drawn == ["ku-fcf", "ku-fcf-fedmr", "ku-fedavg"]
    _assert_png(out)


VARIANTS = ("", "-fedmr", "-gfmfr", "-fedmr-gfmfr")
BACKBONES = ("fedavg", "fcf", "fedncf", "pfedrec", "fedrap")


def test_split_panels_one_per_backbone_only_when_colours_would_repeat():
    four = [f"ml-{b}{v}" for b in BACKBONES for v in VARIANTS]       # 15 colours: ID and FedMR share one
    backbone_of = {label: label.split("-")[1] for label in four}
    panels = plots.split_panels(four, backbone_of)
    assert [name for name, _ in panels] == list(BACKBONES)
    assert panels[1] == ("fcf", ["ml-fcf", "ml-fcf-fedmr", "ml-fcf-gfmfr", "ml-fcf-fedmr-gfmfr"])
    two = [f"ml-{b}{v}" for b in BACKBONES for v in VARIANTS[:2]]     # 5 colours: one panel
    assert plots.split_panels(two, backbone_of) == [("", two)]
    assert plots.split_panels(four, None) == [("", four)]              # nothing to split by
    assert plots.split_panels(four, {label: "fcf" for label in four}) == [("", four)]


def test_plot_validation_one_panel_per_backbone(tmp_path):
    labels = [f"ml-{b}{v}" for b in BACKBONES for v in VARIANTS]
    curves = [(label, [_rows([0.1 + 0.01 * i, 0.2, 0.25]), _rows([0.12, 0.22])]) for i, label in enumerate(labels)]
    curves.append(("ml-fedrap-empty", [[{"round": 0, "train/loss": 1.0}]]))
    backbone_of = {label: label.split("-")[1] for label, _ in curves}
    out = tmp_path / "valid.png"
    drawn = plots.plot_validation(curves, out, metric="hr@50", title="ML", panel_of=backbone_of)
    assert drawn == labels
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (1380, 720)    # 3 x 2 panels of 4.6 x 3.4 in (+ title)
    assert out.stat().st_size < 300_000


def test_metric_names():
    assert plots.full_metric("hr@50") == "valid/hr@50" and plots.full_metric("valid/ndcg@10") == "valid/ndcg@10"
    assert plots.metric_label("valid/hr@50") == "HR@50"
    assert plots.selection_metric([SimpleNamespace(summary=None),
                                   SimpleNamespace(summary={"selection": {"metric": "valid/hr@50"}})]) == "valid/hr@50"
    assert plots.selection_metric([SimpleNamespace(summary=None)]) == plots.DEFAULT_METRIC == "valid/hr@10"


def _fake_result(runs_dir: Path, key: str, seed: int, values):
    """A finished run (run dir with metrics.jsonl + summary.json), or a missing one (values None)."""
    run_dir = runs_dir / key / f"seed-{seed}"
    train = SimpleNamespace(protocol="p3", selection=lambda: "hr@50")
    config = SimpleNamespace(train=train, model=SimpleNamespace(backbone=key.split("-")[1]))
    spec = SimpleNamespace(key=key, seed=seed, run_dir=run_dir, config=config)
    if values is None:
        return SimpleNamespace(spec=spec, status="missing", summary=None)
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in _rows(values)))
    summary = {"config": {"name": key}, "rounds_run": len(values),
               "selection": {"metric": METRIC, "best_round": 0, "valid": {"hr@50": values[0]}, "test": {"hr@50": 0.1}}}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return SimpleNamespace(spec=spec, status="skipped", summary=summary, extra={})


def test_cli_plot_from_run_directories(tmp_path, capsys):
    from pipeline.report.cli import _plot

    runs = tmp_path / "runs"
    results = [_fake_result(runs, "ku-fcf", 0, [0.3, 0.4, 0.5]), _fake_result(runs, "ku-fcf", 1, [0.5, 0.6]),
               _fake_result(runs, "ku-fcf-fedmr", 0, [0.4, 0.5, 0.6]), _fake_result(runs, "ku-fcf-fedmr", 1, None),
               _fake_result(runs, "ku-fedavg", 0, None)]
    assert plots.curves_from_results(results, log=lambda message: None) == [
        ("ku-fcf", [_rows([0.3, 0.4, 0.5]), _rows([0.5, 0.6])]), ("ku-fcf-fedmr", [_rows([0.4, 0.5, 0.6])])]
    args = argparse.Namespace(plot=tmp_path / "results" / "ku_valid.png", plot_metric=None,
                              out=tmp_path / "results" / "ku.md", title="KU")
    figures = _plot(args, results)
    assert figures == [("validation HR@50 over rounds", "ku_valid.png")]
    _assert_png(args.plot)
    err = capsys.readouterr().err
    assert "ku-fcf-fedmr seed 1 (missing)" in err and "no finished run of ku-fedavg" in err
    # another metric, the report in another folder: the link is relative to the report's folder
    args.plot_metric, args.out = "hr@10", tmp_path / "reports" / "ku.md"
    assert _plot(args, results) == [("validation HR@10 over rounds", "../results/ku_valid.png")]


def test_cli_plot_one_panel_per_backbone_for_many_configs(tmp_path):
    from pipeline.report.cli import _plot

    keys = [f"ml-{b}{v}" for b in BACKBONES for v in VARIANTS]
    results = [_fake_result(tmp_path / "runs", key, 0, [0.1, 0.2 + 0.01 * i]) for i, key in enumerate(keys)]
    args = argparse.Namespace(plot=tmp_path / "ml_valid.png", plot_metric=None, out=tmp_path / "ml.md", title="ML")
    assert _plot(args, results) == [("validation HR@50 over rounds", "ml_valid.png")]
    with Image.open(args.plot) as image:
        assert image.size == (1380, 720)                                  # 5 backbone panels, not one
    _plot(args, results[:8])                                              # 2 backbones, 6 colours: one panel
    _assert_png(args.plot)


def test_report_links_the_figure():
    from pipeline.report.tables import build_report

    markdown = build_report([], title="T", figures=[("validation HR@50 over rounds", "ku_valid.png")])["markdown"]
    assert "\n![validation HR@50 over rounds](ku_valid.png)" in markdown


def test_plot_option_reaches_the_parsers(capsys):
    from pipeline.cli import build_parser

    args = build_parser().parse_args(["experiments", "--configs", "c.yaml", "--plot", "r/ku.png",
                                      "--plot-metric", "valid/hr@10"])
    assert args.plot == Path("r/ku.png") and args.plot_metric == "valid/hr@10"
    assert build_parser().parse_args(["experiments", "--configs", "c.yaml"]).plot is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["experiments", "--help"])
    assert "--plot" in capsys.readouterr().out
    from pipeline.report.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    assert "--plot PATH" in help_text and "--plot-metric" in help_text


def test_one_png_per_protocol():
    from pathlib import Path

    from pipeline.report.plots import protocol_paths

    assert protocol_paths(Path("r/x.png"), ["p3"]) == {"p3": Path("r/x.png")}
    assert protocol_paths(Path("r/x.png"), ["p1", "p3"]) == {"p1": Path("r/x_p1.png"), "p3": Path("r/x_p3.png")}
