"""Loaders on the real datasets in ../shared/data (read in place, never copied).

The folder is located beside the repository, or by PIPELINE_DATA_ROOT; tests skip only
when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.data import loaders
from pipeline.data.schema import TEST, TRAIN, VALID, DataError

DATA_ROOT = Path(os.environ.get("PIPELINE_DATA_ROOT") or Path(__file__).resolve().parents[2].parent / "shared" / "data")
KU = DATA_ROOT / "ku"
ML = DATA_ROOT / "movielens-100k-mm"

pytestmark = pytest.mark.realdata


def need(path: Path) -> Path:
    if not path.is_dir():
        pytest.skip(f"real data not found at {path} (set PIPELINE_DATA_ROOT to the shared data folder)")
    return path


@pytest.fixture(scope="module")
def ku():
    # the KU release holds 5 exact duplicate rows (users 134-138, item 285); prepare drops them
    return loaders.load("fedmr", need(KU), allow_duplicates=True)


@pytest.fixture(scope="module")
def movielens():
    return loaders.load("movielens-mm", need(ML))


def test_ku_counts(ku):
    inter = ku.interactions
    assert len(inter) == 3489
    assert len(np.unique(inter.user)) == 204 and len(np.unique(inter.item)) == 560
    counts = np.bincount(inter.split, minlength=3)
    assert (counts[TRAIN], counts[VALID], counts[TEST]) == (3081, 204, 204)
    assert ku.source["dropped_missing"] == 0


def test_ku_features(ku):
    f = ku.features
    assert f.shapes() == {"text": [560, 512], "image": [560, 512]}
    np.testing.assert_array_equal(f.item_id, np.arange(560))
    for m in f.matrices.values():
        assert m.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(m, axis=1), 1.0, atol=1e-3)


def test_ku_exact_duplicates_are_reported_by_default():
    with pytest.raises(DataError) as err:
        loaders.load("fedmr", need(KU))
    assert err.value.row == 1852 and "of row 1851" in err.value.reason


def test_movielens_counts(movielens):
    inter = movielens.interactions
    assert len(inter) == 100_000
    assert len(np.unique(inter.user)) == 943 and len(np.unique(inter.item)) == 1682
    assert inter.rating.dtype == np.float32
    assert movielens.source["tmdb_duplicate_rows"] == 64


def test_movielens_catalogue(movielens):
    cat = movielens.catalogue
    assert len(cat) == 1682 and len(np.unique(cat.item_id)) == 1682
    images = cat.image[cat.image != ""]
    assert len(images) == 1663 and all(Path(p).is_absolute() and Path(p).is_file() for p in images)
    assert cat.text[0].startswith("Toy Story (1995). Led by Woody")
    titles = pd.read_csv(ML / "u.item", sep="|", header=None, encoding="latin-1", usecols=[1])[1].str.strip()
    with_overview = [t.startswith(f"{title}. ") for t, title in zip(cat.text, titles)]
    assert sum(with_overview) == 1664  # SOURCE.md: 1,664 movies have an overview
    assert all(w or t == f"{title}." for w, t, title in zip(with_overview, cat.text, titles))


def test_movielens_threshold(movielens):
    ds = loaders.load("movielens-mm", need(ML), rating_threshold=4)
    assert len(ds.interactions) == 55_375 and (ds.interactions.rating >= 4).all()
    assert len(np.unique(ds.interactions.user)) == 942
    assert len(ds.catalogue) == 1682
