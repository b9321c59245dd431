"""Prepared data lives under one data root, never the working directory, and `baselines` reads any
dataset a path or an experiment config names."""

import json
from pathlib import Path


def test_the_data_cache_is_one_root_never_the_working_directory(tmp_path, monkeypatch):
    from pipeline.data.cache import ENV, data_cache_root

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_cache_root() == tmp_path / "xdg" / "fedmm-pipeline" / "prepared"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert data_cache_root() == Path.home().resolve() / ".cache" / "fedmm-pipeline" / "prepared"
    monkeypatch.setenv(ENV, "rel/cache")  # resolved once: a later chdir changes nothing
    assert data_cache_root() == tmp_path / "rel" / "cache"
    assert data_cache_root("given") == tmp_path / "given"  # an explicit --data-cache wins


def test_baselines_take_a_dataset_path_and_a_config(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.setenv("PIPELINE_DATA_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "mine"
    assert main(["data", "synth", "--out", str(folder), "--users", "80", "--items", "60", "--no-images"]) == 0
    config = tmp_path / "mine.yaml"
    config.write_text(f"data:\n  name: from-config\n  format: generic\n  path: {folder}\n")
    capsys.readouterr()
    assert main(["baselines", str(folder), "--format", "generic", "--config", str(config), "--protocol", "p3",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    described = {d["dataset"]: d for d in report["datasets"]}
    assert set(described) == {folder.name, "from-config"}
    assert described[folder.name]["fingerprint"] == described["from-config"]["fingerprint"]
    assert described[folder.name]["users"] <= 80
    assert {row["dataset"] for row in report["rows"]} == set(described)
    assert (tmp_path / "cache").is_dir()


def test_data_prepare_fills_the_cache_that_train_reads(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main
    from pipeline.config import load_config
    from pipeline.federated.runtime.run import open_checked

    cache = tmp_path / "cache"
    monkeypatch.setenv("PIPELINE_DATA_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    assert main(["data", "prepare", "--dataset", "synthetic", "--synthetic-users", "40", "--synthetic-items", "30",
                 "--synthetic-seed", "2"]) == 0
    assert str(cache) in capsys.readouterr().out
    prepared = lambda: sorted(p for p in cache.iterdir() if (p / "meta.json").is_file())  # noqa: E731
    assert len(prepared()) == 1 and prepared()[0].name.startswith("synthetic-")
    made = (prepared()[0] / "meta.json").stat().st_mtime_ns
    open_checked(load_config(None, ["data.synthetic={n_users: 40, n_items: 30, seed: 2}"]))  # what train opens
    assert len(prepared()) == 1 and (prepared()[0] / "meta.json").stat().st_mtime_ns == made  # read, not re-made
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # nothing in the working directory


def test_default_outputs_go_under_one_runs_root_never_the_working_directory(tmp_path, monkeypatch):
    """A config without runtime.out, `sweep` without --storage, `run` without --workdir and
    `experiments` without --runs-dir write under $PIPELINE_RUNS (else the XDG data folder), an
    absolute path whatever folder the command runs in; a folder the user names is kept as given."""
    from pipeline.cli import build_parser
    from pipeline.config import load_config
    from pipeline.paths import ENV, runs_root
    from pipeline.report.experiments import plan_runs

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert runs_root() == tmp_path / "xdg" / "fedmm-pipeline" / "runs"
    (tmp_path / "xdg").mkdir()
    monkeypatch.delenv("XDG_DATA_HOME")
    assert runs_root() == Path.home().resolve() / ".local" / "share" / "fedmm-pipeline" / "runs"
    root = tmp_path / "runs root"
    monkeypatch.setenv(ENV, str(root))
    assert runs_root() == root
    monkeypatch.chdir(tmp_path / "xdg")  # another working directory changes nothing
    assert load_config(None, []).runtime.out == root / "train"
    parser = build_parser()
    assert parser.parse_args(["sweep", "--space", "s.yaml", "--name", "n"]).storage == root / "sweeps"
    assert parser.parse_args(["run"]).workdir == root / "main"
    [spec] = plan_runs([Path(__file__).resolve().parents[2] / "configs/synthetic/fcf.yaml"], seeds=[0])
    assert spec.run_dir.is_relative_to(root / "experiments")
    # a folder the user names is used as given
    assert load_config(None, ["runtime.out=mine"]).runtime.out == Path("mine")
    assert parser.parse_args(["run", "--workdir", "w"]).workdir == Path("w")
