"""Mistakes refused at start: one line on stderr (exit 2, no traceback) naming the file or --set
override, the key and the reason, before Ray starts and before anything is written. The real CLI
in subprocesses (helpers from test_nothing_lost); every input is digested before and after, and
no run directory is left behind."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from test_nothing_lost import REPO, TINY, digest, refused, run_cli


def refused_at_start(done, message: str) -> None:
    """Exit 2, no traceback, `message` on stderr as the one error line the user sees (after the
    one-line notes of data prepared on the way, if any)."""
    refused(done, message)
    assert done.returncode == 2, done.stderr[-3000:]
    *before, last = done.stderr.strip().splitlines()
    assert last == f"error: {message}", done.stderr[-3000:]
    assert all(line.startswith("prepared ") for line in before), done.stderr[-3000:]


# -------------------------------------------------------------------------------- configs


def test_config_mistakes_are_one_line_naming_the_source_and_key(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  rounds: [3\nmodel: {}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  rounds: 3\n  participation: 2\n")
    out = tmp_path / "run"
    before = digest(tmp_path)
    cases = [
        (["--config", broken], f"{broken}:3:6: not valid YAML: expected ',' or ']', but got ':' (while parsing a "
                               f"flow sequence)"),
        (["--config", bad], f"{bad}: train.participation: Input should be less than or equal to 1 (got 2)"),
        (["--set", "train.rounds=true"], "--set train.rounds=true: train.rounds: expected an integer, got the "
                                         "boolean true"),
        (["--set", "train.eval_ks=[5, 500]"], "--set train.eval_ks=[5, 500]: train.eval_ks=[5, 500] lacks 50, the K "
                                              "of the default selection metric hr@50 (protocol p3): add 50 to "
                                              "train.eval_ks or set train.selection_metric to hr@K, ndcg@K or mrr@K with K "
                                              "in [5, 500]"),
    ]
    for args, message in cases:
        refused_at_start(run_cli(tmp_path, "train", *args, "--out", out), message)
    assert digest(tmp_path) == before  # no run directory, no prepared data: nothing started


def test_bool_for_a_number_is_refused_everywhere_in_a_config():
    from pipeline.config import ConfigError, load_config

    for override, key in (("train.participation=true", "train.participation"), ("model.dim=false", "model.dim"),
                          ("train.eval_ks=[10, true, 50]", "train.eval_ks"),
                          ("train.lr_groups={item: true}", "train.lr_groups"),
                          ("data.protocol.min_user=true", "data.protocol.min_user")):
        with pytest.raises(ConfigError, match=f"{key}: .*the boolean"):
            load_config(None, [override])
    assert load_config(None, ["runtime.progress=false", "train.neg_exclude_heldout=true"]).train.neg_exclude_heldout
    with pytest.raises(ConfigError) as error:  # the generator's settings too, with the rest of the config
        load_config(None, ["data.synthetic={n_users: true}"])
    assert str(error.value) == ("--set data.synthetic={n_users: true}: data.synthetic: n_users: expected an integer, "
                                "got the boolean true")


# -------------------------------------------------------------------------------- sweeps


@pytest.mark.parametrize("spec, reason", [
    ({"uniform": [0.5, 2.0]}, "{uniform: [0.5, 2.0]} can draw 2.0, which the config refuses: train.participation: "
                              "Input should be less than or equal to 1 (got 2.0)"),
    ({"choice": []}, "choice needs a non-empty list of values, got []"),
    ({"uniform": [1.0, 0.1]}, "uniform [1.0, 0.1]: low must be below high"),
    ({"loguniform": [0.0, 1.0]}, "loguniform [0.0, 1.0]: low must be above 0 (a log scale)"),
    ({"randint": [1, 1]}, "randint [1, 1) is empty: low must be below high (high is excluded)"),
], ids=["uniform-beyond-range", "empty-choice", "reversed", "loguniform-at-0", "empty-randint"])
def test_a_sweep_space_is_checked_whole_before_ray(tmp_path, request, spec, reason):
    from tune.sweep import SearchSpace

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"base": str(REPO / "configs/synthetic/fcf.yaml"),
                                     "params": {"train.participation": spec}}))
    message = f"{space}: params.train.participation: {reason}"
    if request.node.callspec.id == "uniform-beyond-range":  # one through the CLI: nothing written, Ray never started
        before = digest(tmp_path)
        refused_at_start(run_cli(tmp_path, "sweep", "--space", space, "--name", "s", "--storage",
                                 tmp_path / "sweeps"), message)
        assert digest(tmp_path) == before
    with pytest.raises(ValueError) as error:
        SearchSpace.load(space)
    assert str(error.value) == message


def test_a_sweep_space_is_checked_in_every_combination(tmp_path):
    """Two keys valid alone but not together: refused when the space loads, naming the point."""
    from tune.sweep import SearchSpace

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"base": str(REPO / "configs/synthetic/fcf.yaml"), "params": {
        "train.eval_ks": {"choice": [[10, 50], [10, 20, 50]]},
        "train.selection_metric": {"choice": ["hr@50", "ndcg@20"]}}}))
    with pytest.raises(ValueError) as error:
        SearchSpace.load(space)
    assert str(error.value).startswith(f'{space}: the point {{train.eval_ks: [10, 50], train.selection_metric: '
                                       f'"ndcg@20"}}: ')
    assert "train.selection_metric='ndcg@20': expected hr@K, ndcg@K or mrr@K with K in train.eval_ks=[10, 50]" \
        in str(error.value)


def _fusion_base(folder, features=None, modalities="[id, text]"):
    base = folder / "base.yaml"
    base.write_text("name: tiny\ndata:\n  synthetic: {n_users: 30, n_items: 25, images: false}\n"
                    + (f"  features: {features}\n" if features else "")
                    + f"model:\n  fusion: {{modalities: {modalities}}}\n"
                    + "train: {rounds: 2}\nruntime: {pools: 1, progress: false}\n")
    return base


def test_a_sweep_checks_the_features_of_every_point_before_ray(tmp_path):
    """The feature store of a point other than the first sampled one holds NaN: refused before Ray
    starts, naming the point; no sweep folder, the stores unchanged."""
    good = _feature_store(tmp_path / "good", 25, bad_row=None)
    bad = _feature_store(tmp_path / "bad", 25, bad_row=3)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"base": str(_fusion_base(tmp_path, features=good)), "params": {
        "data.features": {"choice": [str(good), str(bad)]}, "train.lr": {"uniform": [0.01, 0.1]}}}))
    before = digest(good), digest(bad)
    done = run_cli(tmp_path, "sweep", "--space", space, "--name", "s", "--storage", tmp_path / "sweeps")
    refused_at_start(done, f'{space}: the point {{data.features: "{bad}"}}: {bad / "text.npy"}: NaN or inf in '
                           f'feature row 3 (0-based, item id 3): features must be finite; re-encode them')
    assert (digest(good), digest(bad)) == before and not (tmp_path / "sweeps").exists()


def test_a_sweep_checks_the_modalities_of_every_point(tmp_path):
    """A fusion module that reads text at one choice, on data without features (and the check counts
    one opening per distinct data and modalities, not one per point)."""
    from tune.sweep import SearchSpace, check_points_data

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"base": str(_fusion_base(tmp_path, modalities="[id]")), "params": {
        "model.fusion.modalities": {"choice": [["id"], ["id", "text"]]}, "train.lr": {"uniform": [0.01, 0.1]}}}))
    loaded = SearchSpace.load(space)
    assert len(loaded.points()) == 4
    with pytest.raises(ValueError) as error:
        check_points_data(loaded, space, tmp_path / "cache")
    assert str(error.value) == (f'{space}: the point {{model.fusion.modalities: ["id", "text"]}}: model.fusion reads '
                                f"text features but dataset 'synthetic' has none: set data.features to a feature "
                                f"store (python -m pipeline encode), or drop text from model.fusion.modalities, or "
                                f"set model.fusion: null (ID only)")
    good = _feature_store(tmp_path / "good", 25, bad_row=None)
    space.write_text(yaml.safe_dump({"base": str(_fusion_base(tmp_path, features=good, modalities="[id]")),
                                     "params": {"model.fusion.modalities": {"choice": [["id"], ["id", "text"]]},
                                                "train.lr": {"uniform": [0.01, 0.1]}}}))
    assert check_points_data(SearchSpace.load(space), space, tmp_path / "cache") == 2


# -------------------------------------------------------------------------------- data


def _feature_store(folder, n_items: int, bad_row: int | None):
    from pipeline.encode.store import write_store

    text = np.random.default_rng(0).normal(size=(n_items, 8)).astype(np.float32)
    if bad_row is not None:
        text[bad_row, 2] = np.nan
    return write_store(folder, np.arange(n_items), {"text": text}, {"modalities": {"text": {"dim": 8}}})


def test_a_feature_store_with_nan_is_refused_before_ray(tmp_path):
    store = _feature_store(tmp_path / "features", 25, bad_row=3)
    before = digest(store)
    done = run_cli(tmp_path, "train", "--out", tmp_path / "run", "--set", *TINY, f"data.features={store}",
                   "model.fusion={modalities: [id, text]}")
    refused_at_start(done, f"{store / 'text.npy'}: NaN or inf in feature row 3 (0-based, item id 3): features "
                           f"must be finite; re-encode them")
    assert digest(store) == before and not (tmp_path / "run").exists()


def test_fusion_on_a_dataset_without_features_is_refused_before_ray(tmp_path):
    done = run_cli(tmp_path, "train", "--out", tmp_path / "run", "--set", *TINY, "model.fusion.fusion=sum")
    refused_at_start(done, "model.fusion reads text and image features but dataset 'synthetic' has none: set "
                           "data.features to a feature store (python -m pipeline encode), or drop text and image "
                           "from model.fusion.modalities, or set model.fusion: null (ID only)")
    assert not (tmp_path / "run").exists()
    assert "Ray" not in done.stderr and "ray" not in done.stdout


@pytest.fixture
def interactions(tmp_path):
    """A generic dataset of 30 users (interactions.csv), made from the synthetic generator."""
    from pipeline.data import synthetic

    data = synthetic.generate(synthetic.SyntheticConfig(n_users=30, n_items=20, images=False), progress=False)
    inter = data.dataset.interactions
    folder = tmp_path / "mine"
    folder.mkdir()
    pd.DataFrame({"user_id": inter.user, "item_id": inter.item, "timestamp": inter.timestamp}).to_csv(
        folder / "interactions.csv", index=False)
    return folder / "interactions.csv"


def test_a_line_cut_short_is_refused_or_skipped_and_counted(interactions):
    text = interactions.read_text().rstrip("\n")
    interactions.write_text(text.rsplit(",", 1)[0] + "\n")  # the last line lost its timestamp
    rows = len(text.splitlines())
    before = digest(interactions.parent)
    done = run_cli(interactions.parent, "data", "stats", interactions.parent, "--format", "generic")
    refused_at_start(done, f"{interactions}, row {rows}, column 'timestamp': the line has 2 of 3 fields (cut "
                           f"short?), so its timestamp is missing; fix the file, or pass skip_missing=True (CLI: "
                           f"--skip-missing) to drop rows with an empty user_id / item_id / timestamp (they are "
                           f"counted in `data stats` and the run summary)")
    skipped = run_cli(interactions.parent, "data", "stats", interactions.parent, "--format", "generic",
                      "--skip-missing", "--json")
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    stats = json.loads(skipped.stdout)
    assert stats["skipped_rows_missing_fields"] == 1 and stats["raw"]["interactions"] == rows - 2
    assert stats["protocol_steps"]["skipped_rows_missing_fields"] == 1
    shown = run_cli(interactions.parent, "data", "stats", interactions.parent, "--format", "generic",
                    "--skip-missing")
    assert any(line.split() == ["skipped_rows_missing_fields", "1"] for line in shown.stdout.splitlines())
    assert digest(interactions.parent) == before


@pytest.mark.slow  # real Ray: a federated run on the file
def test_skipped_rows_are_counted_in_the_run_summary(interactions):
    """skip_missing through a training run: the run summary's dataset block and train's output
    give the number of rows dropped; the file itself is left as it is."""
    text = interactions.read_text().rstrip("\n")
    lines = text.splitlines()
    user, item, _ = lines[3].split(",")
    lines[3] = f"{user},{item},"  # an empty timestamp
    interactions.write_text("\n".join(lines[:-1]) + "\n" + lines[-1].rsplit(",", 1)[0] + "\n")  # and a cut line
    before = digest(interactions)
    run = interactions.parent.parent / "run"
    done = run_cli(interactions.parent.parent, "train", "--out", run, "--set", "runtime.pools=1",
                   "runtime.progress=false", "train.rounds=1", f"data.path={interactions.parent}", "data.format=generic",
                   "data.name=mine", "data.loader_options={skip_missing: true}")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["dataset"]["skipped_rows_missing_fields"] == 2
    assert "input rows skipped for an empty user, item or timestamp (skip_missing): 2" in done.stdout
    assert digest(interactions) == before


def test_a_decimal_id_is_refused(interactions):
    lines = interactions.read_text().splitlines()
    user, _, timestamp = lines[5].split(",")
    lines[5] = f"{user},1.5,{timestamp}"
    interactions.write_text("\n".join(lines) + "\n")
    before = digest(interactions.parent)
    done = run_cli(interactions.parent, "data", "stats", interactions.parent, "--format", "generic", "--skip-missing")
    refused_at_start(done, f"{interactions}, row 6, column 'item_id': id '1.5' is not an integer: ids are whole "
                           f"numbers or names, not decimal numbers")
    assert digest(interactions.parent) == before


# -------------------------------------------------------------------------------- recommend


def test_recommend_k_below_one_is_refused(tmp_path):
    refused_at_start(run_cli(tmp_path, "recommend", "--run", tmp_path / "nowhere", "--user", 1, "--k", 0),
                     "recommend --k 0: the number of items to recommend must be 1 or more")
