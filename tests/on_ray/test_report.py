"""The `experiments` command: runs over seeds, resumability, and the results table's labels.

One tiny synthetic dataset, two configs (FedAvg under P3, FCF under P1), 2 seeds, 2 rounds.
"""

from __future__ import annotations

import json
import re

import pytest
import ray

from pipeline.config import load_config
from pipeline.report import tables
from pipeline.report.cli import main
from pipeline.report.experiments import StaleRunError, expand_configs, plan_runs, run_state

TINY = """\
name: {name}
data:
  name: synthetic
  synthetic: {{n_users: 80, n_items: 60, mean_interactions: 12, seed: 3}}
model:
  backbone: {backbone}
  dim: 8
train:
  protocol: {protocol}
  rounds: 2
  patience: 20
  local_epochs: 1
runtime:
  out: runs/ignored
  pools: 1
  progress: false
  tensorboard: false
"""


def _write_configs(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a-fedavg.yaml").write_text(TINY.format(name="tiny-fedavg", backbone="fedavg", protocol="p3"))
    (folder / "b-fcf.yaml").write_text(TINY.format(name="tiny-fcf", backbone="fcf", protocol="p1"))
    return folder


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    _write_configs(root / "configs")
    yield root
    if ray.is_initialized():
        ray.shutdown()


def _section(markdown: str, heading_part: str) -> str:
    """The text of the `## ...` section whose heading contains heading_part."""
    for block in markdown.split("\n## ")[1:]:
        if heading_part in block.splitlines()[0]:
            return block
    raise AssertionError(f"no section {heading_part!r} in:\n{markdown}")


@pytest.fixture(scope="module")
def first_run(workspace):
    import os

    cwd = os.getcwd()
    os.chdir(workspace)  # the configs and runs are relative
    try:
        out = workspace / "results" / "tiny.md"
        argv = ["--configs", "configs/*.yaml", "--seeds", "0", "1", "--runs-dir", "runs/exp",
                "--out", str(out), "--title", "Tiny", "--set", "runtime.checkpoint_every=1"]
        code = main(argv)
        yield code, out.read_text(), argv
    finally:
        os.chdir(cwd)


def test_table_renders_mean_std_and_labels(first_run, workspace):
    code, markdown, _ = first_run
    assert code == 0, markdown
    assert markdown.startswith("<!-- made by: python -m pipeline.report.cli --configs 'configs/*.yaml' --seeds 0 1")
    assert "# Tiny" in markdown
    for seed in (0, 1):
        for key in ("tiny-fedavg", "tiny-fcf"):
            assert (workspace / "runs/exp" / key / f"seed-{seed}" / "summary.json").is_file()
    p3 = _section(markdown, "P3")
    assert "**Protocol:** P3; K = 10, 20, 50" in p3
    assert "**Encoder:** none (ID only)" in p3
    assert "**Seeds:** 2 (0, 1); seed s sets train.seed = train.model_seed = s" in p3
    assert "**Dataset:** `synthetic`" in p3 and "k-core" in p3.lower() and "rating threshold" in p3
    assert "validation HR@50" in p3
    assert "rounds cap 2" in p3
    row = next(line for line in p3.splitlines() if line.startswith("| FedAvg"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == tables.LEARNED
    assert all(re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d", c) for c in cells[2:9]), cells   # 6 test + valid
    assert cells[-1] == "2"
    header = next(line for line in p3.splitlines() if line.startswith("| Method"))
    assert "test HR@50" in header and "test NDCG@10" in header
    p1 = _section(markdown, "P1")
    assert "**Protocol:** P1; K = 10" in p1 and "HR@50" not in p1.split("| Method")[1]


def test_p1_and_p3_never_share_a_table(first_run):
    _, markdown, _ = first_run
    p3, p1 = _section(markdown, "P3"), _section(markdown, "P1")
    assert "| FedAvg" in p3 and "| FCF" not in p3
    assert "| FCF" in p1 and "| FedAvg" not in p1
    assert markdown.count("\n## ") == 2


def test_rerun_skips_finished_runs(first_run, workspace, capsys):
    import os

    _, markdown, argv = first_run
    summaries = sorted((workspace / "runs/exp").glob("*/seed-*/summary.json"))
    stamps = [p.stat().st_mtime_ns for p in summaries]
    cwd = os.getcwd()
    os.chdir(workspace)
    try:
        capsys.readouterr()
        assert main(argv) == 0
        err = capsys.readouterr().err
        assert "4 runs: 0 ran, 0 resumed, 4 skipped" in err
        assert [p.stat().st_mtime_ns for p in summaries] == stamps
        # the same runs give the same table (the header's command aside)
        again = (workspace / "results" / "tiny.md").read_text()
        assert again.split("\n", 1)[1] == markdown.split("\n", 1)[1]
        # report-only with an extra seed: nothing runs, the missing seed is listed
        assert main([*argv[:4], "5", *argv[4:], "--report-only"]) == 0
        text = (workspace / "results" / "tiny.md").read_text()
        assert "Not run (yet; the command resumes them): tiny-fedavg seed 5." in text
        assert "Not run (yet; the command resumes them): tiny-fcf seed 5." in text and "| 2 of 3 |" in text
        assert not (workspace / "runs/exp/tiny-fedavg/seed-5/summary.json").exists()
    finally:
        os.chdir(cwd)


def test_stale_run_is_refused(first_run, workspace, monkeypatch):
    import shutil

    monkeypatch.chdir(workspace)  # the configs and runs are relative
    config = [str(workspace / "configs" / "a-fedavg.yaml")]
    specs = plan_runs(expand_configs(config), seeds=[0], runs_dir=workspace / "runs/exp")
    assert run_state(specs[0]) == "done"
    other = plan_runs(expand_configs(config), seeds=[0], overrides=["train.lr=0.5"], runs_dir=workspace / "runs/exp")
    with pytest.raises(StaleRunError, match="train.lr"):
        run_state(other[0])
    # a summary made on another preparation of the data (fingerprint) is refused too
    copy = workspace / "runs/stale/tiny-fedavg/seed-0"
    shutil.copytree(specs[0].run_dir, copy)
    summary = json.loads((copy / "summary.json").read_text())
    summary["dataset"]["fingerprint"] = "0000000000000000"
    (copy / "summary.json").write_text(json.dumps(summary))
    moved = plan_runs(expand_configs(config), seeds=[0], runs_dir=workspace / "runs/stale")
    with pytest.raises(StaleRunError, match="another preparation"):
        run_state(moved[0])
    # ... and so is one made with other item features (the split the same: another feature store)
    made = json.loads((specs[0].run_dir / "summary.json").read_text())
    assert "features" in made["dataset"]
    summary["dataset"] = {**made["dataset"], "features": "ffffffffffffffff"}
    (copy / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(StaleRunError, match="other item features"):
        run_state(moved[0])
    # a summary from before the features fingerprint is checked on the split alone
    summary["dataset"] = {k: v for k, v in made["dataset"].items() if k != "features"}
    (copy / "summary.json").write_text(json.dumps(summary))
    assert run_state(moved[0]) == "done"


def test_plan_protocol_suffix_and_controlled_keys(tmp_path):
    folder = _write_configs(tmp_path / "configs")
    paths = expand_configs([str(folder / "*.yaml")])
    own = plan_runs(paths, seeds=[0, 1], runs_dir=tmp_path / "r")
    assert [(s.key, s.seed) for s in own] == [("tiny-fedavg", 0), ("tiny-fedavg", 1), ("tiny-fcf", 0), ("tiny-fcf", 1)]
    assert own[1].config.train.seed == 1 and own[1].config.train.model_seed == 1
    assert own[1].run_dir == tmp_path / "r" / "tiny-fedavg" / "seed-1"
    p3 = plan_runs(paths, seeds=[0], overrides=["train.protocol=p3"], runs_dir=tmp_path / "r")
    assert [s.key for s in p3] == ["tiny-fedavg", "tiny-fcf-p3"]
    with pytest.raises(ValueError, match="train.seed"):
        plan_runs(paths, overrides=["train.seed=4"])
    with pytest.raises(FileNotFoundError):
        expand_configs([str(folder / "nothing-*.yaml")])


def test_mean_std_and_cells():
    mean, std = tables.mean_std([1.0, 2.0, 3.0])
    assert mean == 2.0 and std == 1.0                      # sample std (ddof 1)
    assert tables.format_cell([0.01, 0.02, 0.03]) == "2.00 ± 1.00"
    assert tables.format_cell([0.1234]) == "12.34"
    assert tables.format_cell([]) == "–"


def test_reported_ku_table_is_labelled():
    text = tables.render_reported_ku()
    assert text.count(tables.REPORTED) == 5 and "K≈50" in text
    assert "| FedAvg | reported (FedVLR poster, K≈50) | 11.27 | 5.62 |" in text
    assert "+ FedMR" not in text
    with_fedmr = tables.render_reported_ku(with_fedmr=True)
    assert with_fedmr.count(tables.REPORTED) == 10
    assert '| FCF + FedMR | reported (FedVLR poster, K≈50) ("+ ours") | 55.39 | 15.97 |' in with_fedmr


def test_method_labels_name_the_fusion():
    assert tables.method_label("fcf") == "FCF"
    assert tables.method_label("fcf", "moe") == "FCF + FedMR"
    assert tables.method_label("pfedrec", "mlp") == "PFedRec + FedMR (mlp)"
    assert tables.method_label("fcf", None, gfmfr=True) == "FCF + GFMFR"
    assert tables.method_label("fedrap", "moe", gfmfr=True) == "FedRAP + FedMR + GFMFR"
    assert tables.method_label("fcf", None, gfmfr=True, grouping="spectral") == "FCF + GFMFR"
    planted = load_config(None, ["model.backbone=fcf", "model.fusion={}",
                                 "model.gfmfr={group_method: planted, group_num: 4}"])
    assert tables.config_label(planted) == "FCF + FedMR + GFMFR (planted groups)"


def test_trivial_rows_are_labelled(first_run, workspace, monkeypatch):
    """The trivial rankings join the tables (KU must have them), labelled and exact."""
    import os

    monkeypatch.setattr(tables, "TRIVIAL_DATASETS", {"synthetic"})
    cwd = os.getcwd()
    os.chdir(workspace)
    try:
        from pipeline.report.experiments import run_experiments

        specs = plan_runs(expand_configs(["configs/a-fedavg.yaml"]), seeds=[0, 1],
                          overrides=["runtime.checkpoint_every=1"], runs_dir="runs/exp")
        report = tables.build_report(run_experiments(specs, report_only=True))
    finally:
        os.chdir(cwd)
    p3 = _section(report["markdown"], "P3")
    for name in tables.TRIVIAL_RANKINGS:
        assert f"| {name} | {tables.TRIVIAL} |" in p3
    assert "exact (no seed)" in p3 and "Against `popularity` (test HR@50" in p3
    json.dumps(report["tables"], default=str)


def test_recorded_command_drops_report_only():
    from pipeline.report.cli import command_line

    line = command_line(["pipeline", "experiments", "--configs", "a b.yaml", "--report-only", "--out", "r.md"])
    assert line == "python -m pipeline experiments --configs 'a b.yaml' --out r.md"


def _table_rows(markdown: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith("| ")]


def test_records_rebuild_the_table_without_the_run_directories(first_run, workspace, capsys, monkeypatch):
    """--records keeps a small record per finished run; with the run directories gone (a fresh
    clone, another machine) the same command trains nothing and gives the same table and curves."""
    from pipeline.report import plots, records

    _, markdown, argv = first_run
    monkeypatch.chdir(workspace)
    records_dir = workspace / "results" / "records" / "tiny"
    with_records = [*argv, "--records", str(records_dir)]
    with_records[with_records.index("--out") + 1] = "results/tiny_records.md"
    capsys.readouterr()
    assert main(with_records) == 0
    assert "4 runs: 0 ran, 0 resumed, 4 skipped, 0 recorded" in capsys.readouterr().err
    paths = sorted(records_dir.glob("*/seed-*.json"))
    assert [p.relative_to(records_dir).as_posix() for p in paths] == [
        "tiny-fcf/seed-0.json", "tiny-fcf/seed-1.json", "tiny-fedavg/seed-0.json", "tiny-fedavg/seed-1.json"]
    record = json.loads(paths[0].read_text())
    on_disk = json.loads((workspace / "runs/exp/tiny-fcf/seed-0/summary.json").read_text())
    assert record["summary"] == on_disk
    full_rows = plots.read_metrics(workspace / "runs/exp/tiny-fcf/seed-0")
    assert len(record["metrics"]) == len(full_rows) == on_disk["rounds_run"]
    kept = lambda key: key in records.RECORDED_KEYS or key.startswith(records.RECORDED_PREFIXES)  # noqa: E731
    assert all(kept(key) for row in record["metrics"] for key in row)
    assert any(key.startswith("valid/") for key in record["metrics"][0]) and "train/loss" in record["metrics"][0]
    assert any(not kept(key) for key in full_rows[0])  # it did drop some
    stamps = [p.stat().st_mtime_ns for p in paths]
    assert main(with_records) == 0                              # an unchanged record is not rewritten
    assert [p.stat().st_mtime_ns for p in paths] == stamps

    # the run directories are gone: nothing trains, every run comes from its record
    elsewhere = [*with_records]
    elsewhere[elsewhere.index("--runs-dir") + 1] = "runs/elsewhere"
    elsewhere += ["--plot", "results/tiny_records.png"]
    capsys.readouterr()
    assert main(elsewhere) == 0
    assert "4 runs: 0 ran, 0 resumed, 0 skipped, 4 recorded" in capsys.readouterr().err
    assert not (workspace / "runs/elsewhere").exists()
    rebuilt = (workspace / "results" / "tiny_records.md").read_text()
    assert _table_rows(rebuilt) == _table_rows(markdown)
    for protocol, key in (("P3", "tiny-fedavg"), ("P1", "tiny-fcf")):
        assert f"2 of these runs were read from their records (finished earlier, perhaps on another machine; " \
               f"the records folder is in the command above): {key} seed 0/1." in _section(rebuilt, protocol)
    assert all((workspace / "results" / f"tiny_records_{p}.png").stat().st_size > 0 for p in ("p1", "p3"))
    specs = plan_runs(expand_configs(["configs/*.yaml"]), seeds=[0, 1], runs_dir="runs/exp",
                      overrides=["runtime.checkpoint_every=1"])
    from pipeline.report.experiments import run_experiments

    from_disk = run_experiments(specs, report_only=True)
    from_records = run_experiments(plan_runs(expand_configs(["configs/*.yaml"]), seeds=[0, 1],
                                             runs_dir="runs/elsewhere", overrides=["runtime.checkpoint_every=1"]),
                                   report_only=True, records_dir=records_dir)
    assert [r.status for r in from_records] == ["recorded"] * 4
    metric = "valid/hr@50"
    assert [plots.mean_series(rows, metric) for _, rows in plots.curves_from_results(from_records)] == \
        [plots.mean_series(rows, metric) for _, rows in plots.curves_from_results(from_disk)]


def test_a_record_of_another_config_or_not_a_record_is_refused(first_run, workspace, monkeypatch):
    from pipeline.report.experiments import run_experiments

    monkeypatch.chdir(workspace)
    records_dir = workspace / "results" / "records" / "refused"
    config = expand_configs(["configs/a-fedavg.yaml"])
    specs = plan_runs(config, seeds=[0], runs_dir="runs/exp")
    assert [r.status for r in run_experiments(specs, report_only=True, records_dir=records_dir)] == ["skipped"]
    # planned with another learning rate: the record (and the run dir) are of a different config
    other = plan_runs(config, seeds=[0], overrides=["train.lr=0.5"], runs_dir="runs/none")
    [result] = run_experiments(other, report_only=True, records_dir=records_dir)
    assert result.status == "failed"
    assert "tiny-fedavg/seed-0.json was made by a different config" in result.error and "train.lr" in result.error
    # a file that is not a record names itself and the reason
    bad = records_dir / "tiny-fedavg" / "seed-0.json"
    bad.write_text('{"format": "pipeline-run-record/1", "key": "tiny-fedavg", "seed": 0}')
    [result] = run_experiments(plan_runs(config, seeds=[0], runs_dir="runs/none"), report_only=True,
                               records_dir=records_dir)
    assert result.status == "failed" and str(bad) in result.error and "no summary with a selection" in result.error
    bad.write_text("{torn")
    [result] = run_experiments(plan_runs(config, seeds=[0], runs_dir="runs/none"), report_only=True,
                               records_dir=records_dir)
    assert result.status == "failed" and "invalid JSON at line 1" in result.error
    # without the record the run is simply missing
    bad.unlink()
    [result] = run_experiments(plan_runs(config, seeds=[0], runs_dir="runs/none"), report_only=True,
                               records_dir=records_dir)
    assert result.status == "missing"


def test_plot_of_real_runs_reads_at_a_glance(first_run, workspace, monkeypatch, capsys):
    """`--plot` over the real tiny runs: one PNG per protocol, each with its loss panel (their
    metrics.jsonl hold train/loss) and the popularity line computed on their prepared split."""
    from PIL import Image

    from pipeline.data.cache import data_cache_root
    from pipeline.data.datasets import open_dataset
    from pipeline.eval.baselines import evaluate_baselines
    from pipeline.report import plots
    from pipeline.report.plots import _popularity
    from pipeline.report.experiments import run_experiments
    from pipeline.report.tables import display_names

    _, _, argv = first_run
    monkeypatch.chdir(workspace)
    capsys.readouterr()
    assert main([*argv, "--report-only", "--plot", "results/tiny_plot.png"]) == 0
    err = capsys.readouterr().err
    assert "no popularity line" not in err and "no loss panel" not in err, err
    for protocol in ("p1", "p3"):
        with Image.open(workspace / "results" / f"tiny_plot_{protocol}.png") as image:
            assert image.size == (1280, 500)                      # a validation panel and a loss panel
    specs = plan_runs(expand_configs(["configs/*.yaml"]), seeds=[0, 1], runs_dir="runs/exp",
                      overrides=["runtime.checkpoint_every=1"])
    results = run_experiments(specs, report_only=True)
    fcf = [r for r in results if r.spec.key == "tiny-fcf"]
    assert display_names(results) == {"tiny-fedavg": "FedAvg", "tiny-fcf": "FCF"}
    assert plots.selected_rounds(fcf) == {"tiny-fcf": [r.summary["selection"]["best_round"] for r in fcf]}
    data, negatives = open_dataset(fcf[0].spec.config.data, cache=data_cache_root())
    (expected,) = [row["hr@10"] for row in evaluate_baselines(data, negatives, protocols=("p1",), ks=(10,))
                   if row["split"] == "valid"]
    assert _popularity(fcf, "valid/hr@10") == {"popularity (no learning)": pytest.approx(expected)}


def test_encoder_line_names_the_encoders_and_feature_widths(tmp_path):
    """The report's Encoder line: the encoders from the feature store's manifest, the widths
    from the features the prepared dataset holds."""
    from types import SimpleNamespace

    import numpy as np

    from pipeline.encode.store import write_store

    ids = np.arange(3)
    text, image = np.eye(3, 384, dtype=np.float32), np.eye(3, 1280, dtype=np.float32)
    manifest = {"modalities": {
        "text": {"model": "minilm", "model_id": "sentence-transformers/all-MiniLM-L6-v2", "dim": 384},
        "image": {"model": "efficientnet-lite0", "model_id": "efficientnet-lite0 (pytorch)", "dim": 1280}}}
    write_store(tmp_path / "store", ids, {"text": text, "image": image}, manifest)
    prepared = SimpleNamespace(features={"text": text, "image": image})
    fusion = {"model": {"fusion": {"fusion": "moe", "modalities": ["id", "text", "image"]}}}
    line = tables.encoder_of({**fusion, "data": {"features": str(tmp_path / "store")}}, prepared)
    assert line == ("fusion=moe over id+text+image; text: sentence-transformers/all-MiniLM-L6-v2, 384-d; "
                    f"image: efficientnet-lite0 (pytorch), 1280-d (feature store `{tmp_path / 'store'}`)")
    shipped = tables.encoder_of({**fusion, "data": {"features": None}}, prepared)
    assert shipped.endswith("text: 384-d; image: 1280-d (features shipped with the dataset; their encoders are "
                            "not recorded)")
    assert tables.encoder_of({"model": {"fusion": None}}, prepared) == "none (ID only)"


def test_runs_on_another_encoding_of_the_feature_store(tmp_path, monkeypatch, capsys):
    """A recorded run whose item features differ from today's only because the same feature store
    (its manifest key: encoders, settings, inputs) was encoded again (another machine's float
    rounding) is stale by default, with a hint; --accept-reencoded-features counts it and the
    report names it with both fingerprints. A store of another recipe stays stale with the flag."""
    import numpy as np

    from pipeline.encode.store import write_store
    from pipeline.report import experiments

    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "a.yaml").write_text(TINY.format(name="tiny-fedavg", backbone="fedavg", protocol="p1"))
    text = np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)

    def store(values, key):
        write_store(tmp_path / "features", np.arange(60), {"text": values}, {"key": key,
                                                                             "modalities": {"text": {"dim": 8}}})
        experiments._IDENTITIES.clear()  # one process re-reads the data here; a command reads it once

    def experiments_cmd(*extra):
        code = main(["--configs", "configs/a.yaml", "--seeds", "0", "--runs-dir", "runs/exp", "--records", "records",
                     "--out", "table.md", "--set", "runtime.backend=local", "data.features=features", *extra])
        return code, (tmp_path / "table.md").read_text()

    store(text, "recipe-1")
    code, markdown = experiments_cmd()
    assert code == 0, markdown
    made = json.loads((tmp_path / "records/tiny-fedavg/seed-0.json").read_text())["summary"]["dataset"]
    assert made["features_recipe"] == "recipe-1"
    import shutil
    shutil.rmtree(tmp_path / "runs")  # the record alone remains, as in a fresh checkout

    # the same recipe encoded again: a last-bit difference
    store(np.nextafter(text, np.float32(2)), "recipe-1")
    capsys.readouterr()
    code, markdown = experiments_cmd("--report-only")
    assert code != 0 and "FAILED: tiny-fedavg seed 0" in markdown and "--accept-reencoded-features" in markdown
    code, markdown = experiments_cmd("--report-only", "--accept-reencoded-features")
    assert code == 0, markdown
    assert (f"1 of these runs were made on another encoding of the same item feature store" in markdown
            and f"on features {made['features']}: tiny-fedavg seed 0." in markdown)
    # a record from before runs named the recipe counts as the same recipe, under the flag
    record = json.loads((tmp_path / "records/tiny-fedavg/seed-0.json").read_text())
    del record["summary"]["dataset"]["features_recipe"]
    (tmp_path / "records/tiny-fedavg/seed-0.json").write_text(json.dumps(record))
    assert experiments_cmd("--report-only", "--accept-reencoded-features")[0] == 0
    # another recipe (another encoder or inputs) is stale even with the flag, and names no flag
    record["summary"]["dataset"]["features_recipe"] = "recipe-1"
    (tmp_path / "records/tiny-fedavg/seed-0.json").write_text(json.dumps(record))
    store(np.nextafter(text, np.float32(2)), "recipe-2")
    code, markdown = experiments_cmd("--report-only", "--accept-reencoded-features")
    assert code != 0 and "other item features" in markdown and "--accept-reencoded-features to" not in markdown
