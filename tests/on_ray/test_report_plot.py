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


def _assert_png(path: Path, size=(1280, 500)):
    """A small PNG; by default one validation panel beside one loss panel (12.8 x 5 in at dpi 100)."""
    assert path.is_file() and 0 < path.stat().st_size < 200_000
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:
        assert image.size == size


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
    with Image.open(out) as image:  # a row per backbone: its validation panel and its loss panel, 4.6 x 3.4 in each
        assert image.format == "PNG" and image.size == pytest.approx((920, 1740), abs=1)
    assert out.stat().st_size < 400_000
    no_loss = [(label, [[{k: v for k, v in row.items() if k != "train/loss"} for row in rows] for rows in seeds])
               for label, seeds in curves]
    plots.plot_validation(no_loss, out, metric="hr@50", title="ML", panel_of=backbone_of)
    with Image.open(out) as image:  # no loss logged (run records): 3 x 2 validation panels (+ title)
        assert image.size == (1380, 720)


def test_metric_names():
    assert plots.full_metric("hr@50") == "valid/hr@50" and plots.full_metric("valid/ndcg@10") == "valid/ndcg@10"
    assert plots.metric_label("valid/hr@50") == "HR@50"
    assert plots.selection_metric([SimpleNamespace(summary=None),
                                   SimpleNamespace(summary={"selection": {"metric": "valid/hr@50"}})]) == "valid/hr@50"
    assert plots.selection_metric([SimpleNamespace(summary=None)]) == plots.DEFAULT_METRIC == "valid/hr@10"


def _config(key: str, run_dir: Path):
    """A real experiment config of the tiny synthetic set, P3 (selection metric hr@50); a key
    '<x>-<backbone>[-fedmr][-gfmfr]' turns on FedMR and GFMFR."""
    from pipeline.config import load_config

    overrides = [f"name={key}", "data.name=synthetic", "data.synthetic.n_users=60", "data.synthetic.n_items=40",
                 "data.synthetic.mean_interactions=10", "data.synthetic.seed=3", f"model.backbone={key.split('-')[1]}",
                 "model.dim=8", "train.protocol=p3", f"runtime.out={run_dir}"]
    if "-fedmr" in key:
        overrides += ["model.fusion.fusion=moe", "model.fusion.d_f=8"]
    if key.endswith("-gfmfr"):
        overrides.append("model.gfmfr={}")
    return load_config(None, overrides)


def _fake_result(runs_dir: Path, key: str, seed: int, values, best_round: int = 0):
    """A finished run (run dir with metrics.jsonl + summary.json, its config real), or a missing
    one (values None)."""
    from pipeline.report.experiments import RunResult, RunSpec

    run_dir = runs_dir / key / f"seed-{seed}"
    spec = RunSpec(source=run_dir / "config.yaml", key=key, seed=seed,
                   config=_config(key, run_dir), overrides=())
    if values is None:
        return RunResult(spec, "missing")
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in _rows(values)))
    summary = {"config": {"name": key}, "rounds_run": len(values),
               "selection": {"metric": METRIC, "best_round": best_round, "valid": {"hr@50": values[best_round]},
                             "test": {f"{m}@{k}": 0.1 for m in ("hr", "ndcg") for k in (10, 20, 50)}}}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return RunResult(spec, "skipped", summary=summary)


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
        assert image.size == pytest.approx((920, 1740), abs=1)             # 5 backbone rows of 2 panels, not one
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


def _lines(axes, gid=None):
    return [line for line in axes.get_lines() if gid is None or line.get_gid() == gid]


def test_figure_reads_at_a_glance():
    """On the real matplotlib figure: whole-round ticks, a marker on every curve, a star at each
    seed's selected round sitting on its line, the popularity line, a loss panel, a legend on
    every panel, and the tables' names in the legends (never the folder names)."""
    curves = [("ku-fcf", [_rows([0.30, 0.35, 0.36, 0.34]), _rows([0.32, 0.33, 0.31, 0.30])]),
              ("ku-fcf-fedmr", [_rows([0.40, 0.45, 0.50, 0.49]), _rows([0.41, 0.47, 0.52, 0.51])])]
    names = {"ku-fcf": "FCF", "ku-fcf-fedmr": "FCF + FedMR"}
    figure, drawn = plots.validation_figure(curves, "hr@50", names=names, best={"ku-fcf": [2, 1], "ku-fcf-fedmr": [2]},
                                            references={"popularity (no learning)": 0.31})
    figure.canvas.draw()
    assert drawn == ["ku-fcf", "ku-fcf-fedmr"]
    valid, loss = figure.axes                                       # the validation panel and the loss panel
    assert "HR@50" in valid.get_ylabel() and "loss" in loss.get_ylabel()
    for axes in (valid, loss):
        low, high = axes.get_xlim()
        ticks = [t for t in axes.get_xticks() if low <= t <= high]
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks)      # 4 rounds: no 0.5 ticks
        legend = axes.get_legend()
        assert legend is not None
        texts = [text.get_text() for text in legend.get_texts()]
        assert "FCF" in texts and "FCF + FedMR" in texts and not any("ku-" in text for text in texts)
        curve_lines = [line for line in _lines(axes) if line.get_label() in names.values()]
        assert len(curve_lines) == 2
        assert all(line.get_marker() not in (None, "", "None", " ") for line in curve_lines)
        assert curve_lines[0].get_marker() != curve_lines[1].get_marker()
    stars = _lines(valid, "best-round")
    assert [sorted(star.get_xdata().tolist()) for star in stars] == [[1, 2], [2]]
    fcf_mean = {0: 31.0, 1: 34.0, 2: 33.5, 3: 32.0}                 # the stars sit on the mean line (in %)
    assert stars[0].get_ydata().tolist() == pytest.approx([fcf_mean[2], fcf_mean[1]])
    assert all(star.get_marker() == "*" for star in stars) and not _lines(loss, "best-round")
    (reference,) = _lines(valid, "reference")
    assert list(reference.get_ydata()) == pytest.approx([31.0, 31.0])
    assert "popularity (no learning) (31.00)" in [t.get_text() for t in valid.get_legend().get_texts()]
    assert "selected round (best validation)" in [t.get_text() for t in valid.get_legend().get_texts()]
    loss_fcf = next(line for line in _lines(loss) if line.get_label() == "FCF")
    assert loss_fcf.get_ydata().tolist() == pytest.approx([0.30, 0.29, 0.28, 0.27])   # mean train/loss per round


def test_cost_figure_has_a_legend_on_every_panel():
    curves = [("ku-fcf", [[{"round": r, "time/round_seconds": 2.0 + r, "time/clients_per_second": 10.0,
                            "comm/bytes_up": 1e6, "comm/bytes_down": 2e6} for r in range(3)]])]
    figure, drawn = plots.costs_figure(curves, names={"ku-fcf": "FCF"})
    figure.canvas.draw()
    assert drawn == ["ku-fcf"] and len(figure.axes) == 4
    for axes in figure.axes:
        assert [t.get_text() for t in axes.get_legend().get_texts()] == ["FCF"]
        low, high = axes.get_xlim()
        assert all(float(t).is_integer() for t in axes.get_xticks() if low <= t <= high)


def test_cli_plot_names_and_popularity_from_the_prepared_data(tmp_path):
    """_plot (plots.draw_results) names lines as the table rows are named and draws the popularity ranking's
    validation value, computed on the very split the runs' config prepares."""
    from matplotlib.image import imread

    from pipeline.data.cache import data_cache_root
    from pipeline.data.datasets import open_dataset
    from pipeline.eval.baselines import evaluate_baselines
    from pipeline.report.cli import _plot
    from pipeline.report.plots import _popularity
    from pipeline.report.tables import display_names

    results = [_fake_result(tmp_path / "runs", "ku-fcf", 0, [0.3, 0.4, 0.5], best_round=2),
               _fake_result(tmp_path / "runs", "ku-fcf-fedmr", 0, [0.4, 0.5, 0.45], best_round=1)]
    assert display_names(results) == {"ku-fcf": "FCF", "ku-fcf-fedmr": "FCF + FedMR"}
    assert plots.selected_rounds(results) == {"ku-fcf": [2], "ku-fcf-fedmr": [1]}
    data, negatives = open_dataset(results[0].spec.config.data, cache=data_cache_root())
    (expected,) = [row["hr@50"] for row in evaluate_baselines(data, negatives, protocols=("p3",), ks=(50,))
                   if row["split"] == "valid"]
    assert _popularity(results, "valid/hr@50") == {"popularity (no learning)": pytest.approx(expected)}
    # the runs' summaries name another preparation: no line rather than a wrong one
    results[0].summary["dataset"] = {"fingerprint": "0000000000000000"}
    results[1].summary["dataset"] = {"fingerprint": "0000000000000000"}
    assert _popularity(results, "valid/hr@50") == {}
    args = argparse.Namespace(plot=tmp_path / "ku.png", plot_metric=None, out=tmp_path / "ku.md", title="KU")
    assert _plot(args, results) == [("validation HR@50 over rounds", "ku.png")]
    assert imread(args.plot).shape[:2] == (500, 1280)


def test_a_results_plot_redrawn_from_its_records_alone(tmp_path, capsys):
    """`python -m pipeline.report.plots --records DIR --out PNG`: the runs' records only (no run
    directory): curves from their rows, in the tables' backbone order, named from their configs."""
    from pipeline.report import records

    results = [_fake_result(tmp_path / "runs", key, seed, values)
               for key, seed, values in (("ku-fedavg", 0, [0.1, 0.2]), ("ku-fcf", 0, [0.3, 0.4, 0.5]),
                                         ("ku-fcf", 1, [0.3, 0.45]))]
    for result in results:
        result.summary["config"] = json.loads(result.spec.config.model_dump_json())
        rows = plots.read_metrics(result.spec.run_dir)
        records.write_record(tmp_path / "records", records.make_record(result.spec.key, result.spec.seed,
                                                                       result.summary, rows))
    found = plots.results_from_records(tmp_path / "records")
    assert [(r.spec.key, r.spec.seed, r.status) for r in found] == [("ku-fedavg", 0, "recorded"),
                                                                   ("ku-fcf", 0, "recorded"), ("ku-fcf", 1, "recorded")]
    assert found[1].extra["metrics"][2] == {"round": 2, "train/loss": pytest.approx(0.28), "valid/hr@10": 0.25,
                                            METRIC: 0.5, "test/hr@50": 0.5 / 3}
    for result in results:  # the run directories are gone: only the records are left
        for file in result.spec.run_dir.iterdir():
            file.unlink()
    out = tmp_path / "results" / "ku_valid.png"
    assert plots.main(["--records", str(tmp_path / "records"), "--out", str(out), "--title", "KU"]) == 0
    _assert_png(out)                                                # records keep the loss: its panel
    for path in (tmp_path / "records").rglob("seed-*.json"):         # records written before they kept it
        record = json.loads(path.read_text())
        record["metrics"] = [{k: v for k, v in row.items() if k != "train/loss"} for row in record["metrics"]]
        path.write_text(json.dumps(record))
    assert plots.main(["--records", str(tmp_path / "records"), "--out", str(out), "--title", "KU"]) == 0
    _assert_png(out, size=(800, 500))                               # no loss: no loss panel, and it says so
    assert "no train/loss" in capsys.readouterr().err
    (tmp_path / "records" / "ku-fcf" / "seed-1.json").write_text("{}")
    assert plots.main(["--records", str(tmp_path / "records"), "--out", str(out)]) == 2
    assert "not a run record" in capsys.readouterr().err
