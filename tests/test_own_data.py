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
    root = Path(__file__).resolve().parents[1] / "configs"
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
