"""Your own data in the generic format: the dataset's default name, the preparation line that says
what the filters removed, the catalogue's title column, `data stats --config/--features` and
`features import`."""

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.cli import main
from pipeline.data.datasets import NAMED, DatasetConfig, open_dataset


def _generic(folder, users=12, items=9, per_user=6, title=True, extra=None):
    """A small generic dataset: every user rates `per_user` items over time; a catalogue with text
    (and a title column unless title=False). Returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [(u, (u + k) % items + 1, 1000 * u + k) for u in range(1, users + 1) for k in range(per_user)]
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(folder / "interactions.csv", index=False)
    cat = {"item_id": list(range(1, items + 1)), "text": [f"plot of film {i}, a long story" for i in range(1, items + 1)]}
    if title:
        cat["title"] = [f"Film {i} (1999)" for i in range(1, items + 1)]
    cat.update(extra or {})
    pd.DataFrame(cat).to_csv(folder / "catalogue.csv", index=False)
    return folder


def test_dataset_name_defaults_to_the_folder_name(tmp_path):
    folder = _generic(tmp_path / "my_films")
    assert DatasetConfig(format="generic", path=folder).name == "my_films"
    assert DatasetConfig(format="generic", path=folder, name="films").name == "films"  # an explicit name wins
    assert DatasetConfig(format="generic", path=folder / "interactions.csv").name == "interactions"
    assert DatasetConfig().name == "synthetic" and DatasetConfig().generated
    data, _ = open_dataset(DatasetConfig(format="generic", path=folder))
    assert data.name == "my_films" and data.identity()["name"] == "my_films"


def test_the_template_config_without_a_name_is_labelled_by_its_folder(tmp_path):
    from pipeline.config import load_config

    folder = _generic(tmp_path / "shop")
    config = load_config(None, [f"data.path={folder}", "data.format=generic"])
    assert config.data.name == "shop"


def test_preparation_prints_its_filters_and_what_they_removed(tmp_path, capsys):
    folder = tmp_path / "few"
    folder.mkdir()
    # users 1-5 rate items 1-5 (5 each); user 6 rates only 3 items; item 9 is rated once
    rows = [(u, i, 10 * u + i) for u in range(1, 6) for i in range(1, 6)]
    rows += [(6, 1, 100), (6, 2, 101), (6, 9, 102)]
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(folder / "interactions.csv", index=False)
    data, _ = open_dataset(DatasetConfig(format="generic", path=folder))
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("prepared few: ")
    assert "k-core users >= 5, items >= 5: -1 users, -1 items, -3 interactions" in line
    assert "-> 5 users, 5 items, 15 training interactions" in line
    assert (data.n_users, data.n_items) == (5, 5)
    # no k-core: the same data keeps everything, and the line says so
    open_dataset(DatasetConfig(format="generic", path=folder, protocol={"min_user": 0, "min_item": 0}))
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "k-core users >= 3 (min_user 0; 3 is the leave-one-out floor), items >= 0: -0 users, -0 items" in line
    # a cached copy is read without preparing again, so nothing is printed
    cache = tmp_path / "cache"
    open_dataset(DatasetConfig(format="generic", path=folder), cache=cache)
    assert "prepared few" in capsys.readouterr().err
    open_dataset(DatasetConfig(format="generic", path=folder), cache=cache)
    assert "prepared" not in capsys.readouterr().err


def test_named_movielens_keeps_no_k_core_and_the_configs_say_so():
    """The named MovieLens preparation is the committed results' (no k-core); its config headers
    must not claim another."""
    from pathlib import Path

    assert NAMED["movielens"][3] == {"min_user": 0, "min_item": 0}
    assert DatasetConfig(name="movielens").effective_protocol().min_item == 0
    assert DatasetConfig(format="generic", path="x").effective_protocol().min_item == 5
    root = Path(__file__).resolve().parents[2] / "configs"
    for config in root.rglob("*.yaml"):
        text = config.read_text()
        if "name: movielens\n" in text and "min_item" not in text:
            assert "5-core" not in text, config


def test_generic_catalogue_title_column_survives_preparation_and_the_cache(tmp_path, capsys):
    from pipeline.data.loaders import load

    folder = _generic(tmp_path / "films")
    raw = load("generic", folder)
    assert raw.catalogue.title.tolist()[:2] == ["Film 1 (1999)", "Film 2 (1999)"]
    assert "warning" not in capsys.readouterr().err  # every column is one the format reads
    data, _ = open_dataset(DatasetConfig(format="generic", path=folder), cache=tmp_path / "cache")
    assert data.catalogue.title[0] == "Film 1 (1999)"
    again, _ = open_dataset(DatasetConfig(format="generic", path=folder), cache=tmp_path / "cache")
    assert again.catalogue.title.tolist() == data.catalogue.title.tolist()
    # without a title column there are no titles (recommend falls back to the text)
    untitled = load("generic", _generic(tmp_path / "plain", title=False))
    assert untitled.catalogue.title is None


def test_an_unread_catalogue_column_is_named_in_a_warning(tmp_path, capsys):
    from pipeline.data.loaders import load

    folder = _generic(tmp_path / "films", title=False, extra={"titel": ["x"] * 9})
    load("generic", folder)
    err = capsys.readouterr().err
    assert "catalogue.csv" in err and "'titel'" in err and "not read" in err
    # the encode stage reading a catalogue file itself says the same
    from pipeline.encode.catalogue import read_catalogue

    pd.read_csv(folder / "catalogue.csv").assign(image_path="").to_csv(folder / "items.csv", index=False)
    assert read_catalogue(folder / "items.csv").title is None
    assert "items.csv" in (err := capsys.readouterr().err) and "'titel'" in err
    (folder / "items.csv").unlink()
    pd.read_csv(folder / "catalogue.csv").to_parquet(folder / "catalogue.parquet")
    (folder / "catalogue.csv").unlink()
    load("generic", folder)
    assert "catalogue.parquet" in capsys.readouterr().err


def test_the_prompt_template_fills_title_from_the_title_column(tmp_path):
    from pipeline.encode.catalogue import content_hash, from_catalogue, read_catalogue
    from pipeline.encode.config import EncodeConfig
    from pipeline.data.loaders import load

    folder = _generic(tmp_path / "films", extra={"image_path": [""] * 9})
    table = read_catalogue(folder / "catalogue.csv")
    assert table.title[0] == "Film 1 (1999)"
    config = EncodeConfig(prompt="Movie: {title}. {text}")
    assert config.prompted_texts(table.text[:1], table.title[:1]) == ["Movie: Film 1 (1999). plot of film 1, a long story"]
    assert config.prompted("plot only") == "Movie: plot only. plot only"  # no title: the text fills {title}
    # the loader's catalogue gives the stage the same titles, and titles count in the content hash
    loaded = from_catalogue(load("generic", folder).catalogue)
    assert loaded.title.tolist() == table.title.tolist()
    untitled = read_catalogue(_generic(tmp_path / "plain", title=False, extra={"image_path": [""] * 9}) / "catalogue.csv")
    assert untitled.title is None and content_hash(untitled) != content_hash(table)


def _store_for(tmp_path, folder, ids, width=8, name="store", **matrices):
    ids_file = tmp_path / f"{name}_ids.txt"
    ids_file.write_text("\n".join(map(str, ids)) + "\n")
    rng = np.random.default_rng(0)
    files = {}
    for modality in ("text", "image"):
        matrix = matrices.get(modality, rng.normal(size=(len(ids), width)))
        np.save(tmp_path / f"{name}_{modality}.npy", matrix)
        files[modality] = tmp_path / f"{name}_{modality}.npy"
    return ids_file, files


def test_features_import_makes_a_store_that_training_data_reads(tmp_path, capsys):
    from pipeline.encode.store import load_features

    folder = _generic(tmp_path / "films")
    ids = list(range(9, 0, -1))  # any order: the store keeps ids ascending
    ids_file, files = _store_for(tmp_path, folder, ids)
    out = tmp_path / "features"
    assert main(["features", "import", "--ids", str(ids_file), "--text", str(files["text"]), "--image",
                 str(files["image"]), "--out", str(out), "--data", str(folder)]) == 0
    stored_ids, matrices, manifest = load_features(out)
    assert stored_ids.tolist() == list(range(1, 10))
    expected = np.load(files["text"])[::-1]  # the row of id 1 was the last row of the input
    expected = expected / np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(matrices["text"], expected, rtol=1e-5)
    assert manifest["modalities"]["image"]["model_id"] == "imported:store_image.npy"
    data, _ = open_dataset(DatasetConfig(format="generic", path=folder, features=out))
    assert data.features["text"].shape == (9, 8) and data.features["image"].shape == (9, 8)
    # data stats --features checks the store against the dataset
    capsys.readouterr()
    assert main(["data", "stats", str(folder), "--features", str(out), "--json"]) == 0
    check = json.loads(capsys.readouterr().out)["feature_store"]
    assert check["items"] == 9 and check["modalities"]["text"]["dim"] == 8 and check["check"].startswith("ok")


@pytest.mark.parametrize("case, reason", [
    ("short", "8 rows of width 8 for 9 ids"),
    ("nan", "NaN or inf in feature row 3 (0-based, item id 4)"),
    ("zero", "row 2 (0-based; item id 3, id file row 3) is all zeros"),
    ("repeated", "store_ids.txt, row 9: item id 5 repeated (first at row 5)"),
    ("unknown", "item id 77 is not an item of 'films'"),
    ("missing", "1 interacted items of 'films' have no id here (e.g. 9)"),
])
def test_features_import_refuses_bad_input_and_writes_nothing(tmp_path, capsys, case, reason):
    folder = _generic(tmp_path / "films")
    ids = list(range(1, 10))
    matrix = np.random.default_rng(1).normal(size=(9, 8))
    if case == "short":
        matrix = matrix[:8]
    elif case == "nan":
        matrix[3, 1] = np.nan
    elif case == "zero":
        matrix[2] = 0
    elif case == "repeated":
        ids[8] = 5
    elif case == "unknown":
        ids.append(77)
        matrix = np.vstack([matrix, np.ones((1, 8))])
    elif case == "missing":
        ids, matrix = ids[:8], matrix[:8]
    ids_file, files = _store_for(tmp_path, folder, ids, text=matrix)
    out = tmp_path / "features"
    assert main(["features", "import", "--ids", str(ids_file), "--text", str(files["text"]), "--out", str(out),
                 "--data", str(folder)]) == 2
    err = capsys.readouterr().err
    assert reason in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".features")]


def test_data_stats_features_names_the_file_and_row_of_a_damaged_store(tmp_path, capsys):
    folder = _generic(tmp_path / "films")
    ids_file, files = _store_for(tmp_path, folder, list(range(1, 10)))
    out = tmp_path / "features"
    assert main(["features", "import", "--ids", str(ids_file), "--text", str(files["text"]), "--out", str(out)]) == 0
    text = np.load(out / "text.npy")
    text[6, 0] = np.inf  # damaged after the import
    np.save(out / "text.npy", text)
    capsys.readouterr()
    assert main(["data", "stats", str(folder), "--features", str(out)]) == 2
    err = capsys.readouterr().err
    assert "text.npy" in err and "feature row 6" in err and "item id 7" in err
    # a store of another catalogue: the interacted items it lacks are named
    ids_file, files = _store_for(tmp_path, folder, list(range(1, 8)), name="partial")
    partial = tmp_path / "partial"
    assert main(["features", "import", "--ids", str(ids_file), "--text", str(files["text"]), "--out",
                 str(partial)]) == 0
    assert main(["data", "stats", str(folder), "--features", str(partial)]) == 2
    assert "2 interacted items have no feature row" in capsys.readouterr().err


def test_data_stats_config_shows_what_training_prepares_and_reads(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PIPELINE_DATA_CACHE", str(tmp_path / "cache"))
    folder = _generic(tmp_path / "films", users=30, per_user=7)
    ids_file, files = _store_for(tmp_path, folder, list(range(1, 10)), width=6)
    store = tmp_path / "features"
    assert main(["features", "import", "--ids", str(ids_file), "--text", str(files["text"]), "--out", str(store)]) == 0
    config = tmp_path / "exp.yaml"
    config.write_text(f"data:\n  format: generic\n  path: {folder}\n  features: {store}\n"
                      "  protocol: {min_user: 0, min_item: 0}\n"
                      "model:\n  backbone: fcf\n  fusion: {fusion: moe, modalities: [id, text]}\n"
                      "train:\n  protocol: p1\n  rounds: 3\n")
    capsys.readouterr()
    assert main(["data", "stats", "--config", str(config), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["dataset"] == "films" and stats["protocol"]["min_user"] == 0
    training = stats["training"]
    assert training["evaluation"].startswith("P1: the held-out item among 99 sampled negatives")
    assert training["split"] == {"train": 30 * 5, "valid": 30, "test": 30}
    assert training["fusion_reads"]["text"] == [9, 6] and training["data_cache"] == str(tmp_path / "cache")
    assert any((tmp_path / "cache").iterdir())  # prepared where train will read it
    # asking for a modality the store lacks fails as train would, before any training
    assert main(["data", "stats", "--config", str(config), "--set", "model.fusion.modalities=[id,image]"]) == 2
    assert "image" in capsys.readouterr().err


def test_a_runs_relative_data_paths_are_read_from_the_folder_it_was_trained_in(tmp_path):
    from pipeline.config import load_config
    from pipeline.trained import _anchored

    relative = load_config(None, ["data.format=generic", "data.path=mydata", "data.features=runs/features/mydata",
                                  "runtime.out=runs/mydata/fcf"])
    run_dir = tmp_path / "work" / "runs" / "mydata" / "fcf"
    anchored = _anchored(relative, run_dir)
    assert anchored.data.path == tmp_path.resolve() / "work" / "mydata"
    assert anchored.data.features == tmp_path.resolve() / "work" / "runs/features/mydata"
    assert anchored.data.name == "mydata"
    # a run directory that runtime.out does not lead to, or an absolute runtime.out: as written
    assert _anchored(relative, tmp_path / "moved" / "fcf").data.path == relative.data.path
    absolute = relative.model_copy(update={"runtime": relative.runtime.model_copy(update={"out": run_dir})})
    assert _anchored(absolute, run_dir).data.path == relative.data.path
