"""Hostile input for every loader: each damaged dataset loads correctly or raises DataError.

Each test starts from a small valid dataset of one format, damages one of its files (see
tests/helpers/fuzz_inputs.py: cut at a random byte, another encoding, huge/negative ids, NaN/inf,
duplicated headers, extra/missing columns, empty or header-only, random bytes; for parquet
and .npy, hostile column types and arrays) and loads it. Any exception but DataError fails
the test; a DataError must name a file of the dataset; a load that succeeds must satisfy
the loaders' contract (`check_raw`). Images referenced by a dataset are not decoded by the
loaders, so damaging them must not change the load, and the encode stage's decoder must
give every such file a status instead of raising.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz_inputs import FUZZ, PNG, damaged_text, image_file, parquet_file
from pipeline.data import loaders
from pipeline.data.schema import DataError, RawDataset
from pipeline.encode.images import CORRUPT, MISSING, OK, decode_images

# ----------------------------------------------------------------------------- valid datasets

GENERIC_INTERACTIONS = [["user_id", "item_id", "timestamp", "rating"],
                        ["1", "10", "100", "1"], ["2", "10", "101", "0.5"], ["1", "11", "102", "1"],
                        ["3", "12", "103", "4"]]
GENERIC_CATALOGUE = [["item_id", "text", "image_path"],
                     ["10", "ten", "images/10.png"], ["11", '"eleven, a comma"', "images/11.png"], ["12", "", ""]]
FEDMR_INTER = [["userID", "itemID", "rating", "timestamp", "split_label"],
               ["0", "1", "1", "10", "0"], ["0", "2", "1", "20", "1"], ["0", "3", "1", "30", "2"],
               ["1", "0", "4.5", "5", "0"]]
U_DATA = [["1", "10", "5", "881250949"], ["2", "10", "3", "881250950"], ["1", "20", "4", "881250951"]]
U_ITEM = [["10", "Alpha (1995)", "01-Jan-1995", "", "http://x", "0"],
          ["20", "B\u00e9ta (1996)", "01-Jan-1996", "", "http://y", "1"]]
TMDB = [["movie_id", "title", "overview"], ["10", "Alpha", '"First, plot."'], ["20", "Beta", ""],
        ["10", "Alpha", '"First, plot."']]
PAIRS = [["1", "5 6 7"], ["2", "6"], ["3", "7 5"]]
TITLES = [["item", "title"], ["5", "Five"], ["6", '"Six, six"'], ["7", "Seven"]]

# format -> {file: (rows, separator, encoding)}; the images each format references
TEXT_FILES = {
    "generic": {"interactions.csv": (GENERIC_INTERACTIONS, ",", "utf-8"),
                "catalogue.csv": (GENERIC_CATALOGUE, ",", "utf-8")},
    "fedmr": {"inter.csv": (FEDMR_INTER, ",", "utf-8")},
    "movielens-mm": {"u.data": (U_DATA, "\t", "utf-8"), "u.item": (U_ITEM, "|", "latin-1"),
                     "items_tmdb.csv": (TMDB, ",", "utf-8")},
    "microlens": {"X_pairs.tsv": (PAIRS, "\t", "utf-8"), "X_titles.csv": (TITLES, ",", "utf-8")},
}
IMAGES = {"generic": ["images/10.png", "images/11.png"], "movielens-mm": ["posters/10.jpg", "posters/20.jpg"],
          "microlens": ["images/5.jpg", "images/7.jpg"], "fedmr": []}
FEATURES = np.arange(12, dtype=np.float32).reshape(4, 3) / 10  # fedmr: 4 items, row r = itemID r


def write_valid(root: Path, fmt: str) -> None:
    for name, (rows, sep, encoding) in TEXT_FILES[fmt].items():
        (root / name).write_bytes("".join(sep.join(r) + "\n" for r in rows).encode(encoding))
    for name in IMAGES[fmt]:
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_bytes(PNG)
    if fmt == "fedmr":
        np.save(root / "text_features.npy", FEATURES)
        np.save(root / "image_features.npy", FEATURES[:, :2])


# ----------------------------------------------------------------------------- the property


def load_or_data_error(fmt: str, root: Path) -> RawDataset | None:
    """The loaded dataset (checked), or None after a DataError that names a file of `root`."""
    try:
        raw = loaders.load(fmt, root)
    except DataError as error:
        assert Path(error.file).is_relative_to(root), str(error)
        assert str(error).startswith(error.file) and error.reason, str(error)
        assert error.row is None or error.row >= 1, str(error)
        return None
    check_raw(raw)
    return raw


def check_ids(ids: np.ndarray) -> None:
    if ids.dtype == np.int64:
        assert (ids >= 0).all()
    else:
        assert ids.dtype == object and all(isinstance(v, str) and v for v in ids)


def check_raw(raw: RawDataset) -> None:
    """The loaders' contract for a successful load."""
    inter = raw.interactions
    n = len(inter)
    assert n > 0
    check_ids(inter.user)
    check_ids(inter.item)
    assert inter.timestamp.dtype in (np.int64, np.float64) and np.isfinite(inter.timestamp).all()
    if inter.rating is not None:
        assert inter.rating.dtype == np.float32 and np.isfinite(inter.rating).all()
    if inter.split is not None:
        assert inter.split.dtype == np.int8 and np.isin(inter.split, [0, 1, 2]).all()
    if raw.source["format"] != "microlens":  # microlens: one row per user line, exploded to items
        assert raw.source["rows_read"] - raw.source["dropped_missing"] - raw.source.get(
            "dropped_below_threshold", 0) == n
    if raw.catalogue is not None:
        cat = raw.catalogue
        check_ids(cat.item_id)
        assert cat.item_id.dtype == inter.item.dtype
        assert len(set(cat.item_id.tolist())) == len(cat) == len(cat.text) == len(cat.image)
        assert all(isinstance(t, str) for t in cat.text)
        assert all(p == "" or Path(p).is_absolute() for p in cat.image)
    if raw.features is not None:
        rows = len(raw.features.item_id)
        for matrix in raw.features.matrices.values():
            assert matrix.dtype == np.float32 and matrix.shape[0] == rows and np.isfinite(matrix).all()
        assert inter.item.max() < rows


# ----------------------------------------------------------------------------- text files


@pytest.mark.parametrize("fmt", list(TEXT_FILES))
@FUZZ
@given(data=st.data())
def test_damaged_text_file(fmt, data):
    name = data.draw(st.sampled_from(sorted(TEXT_FILES[fmt])), label="file")
    rows, sep, encoding = TEXT_FILES[fmt][name]
    damaged = data.draw(damaged_text(rows, sep, encoding), label="bytes")
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        write_valid(root, fmt)
        (root / name).write_bytes(damaged)
        load_or_data_error(fmt, root)


def test_the_valid_datasets_load():
    """The fuzzed datasets start valid: every damage above is what makes a load fail."""
    with tempfile.TemporaryDirectory() as d:
        for fmt in TEXT_FILES:
            (Path(d) / fmt).mkdir()
            write_valid(Path(d) / fmt, fmt)
            raw = load_or_data_error(fmt, Path(d) / fmt)
            assert raw is not None, fmt
            assert len(raw.interactions) == {"generic": 4, "fedmr": 4, "movielens-mm": 3, "microlens": 6}[fmt]


# ----------------------------------------------------------------------------- huge ids, NaN, inf


NUMBERS = ["9223372036854775807", "9223372036854775808", str(2**63), str(2**64), "-9223372036854775808",
           "-1", "1e400", "nan", "inf", "-inf", "", "0.0", "1e18", "9.2233720368547758e18", str(10**40)]


@pytest.mark.parametrize("fmt", list(TEXT_FILES))
@FUZZ
@given(data=st.data())
def test_hostile_numbers_in_every_cell(fmt, data):
    """Any data cell of any file replaced by a huge, negative or non-finite number: loaded with
    the exact value or refused, never wrapped around, rounded to a colliding id or NaN."""
    name = data.draw(st.sampled_from(sorted(TEXT_FILES[fmt])), label="file")
    rows, sep, encoding = TEXT_FILES[fmt][name]
    header = 0 if name in ("u.data", "u.item", "X_pairs.tsv") else 1
    rows = [list(r) for r in rows]
    i = data.draw(st.integers(header, len(rows) - 1), label="row")
    j = data.draw(st.integers(0, len(rows[i]) - 1), label="column")
    rows[i][j] = data.draw(st.sampled_from(NUMBERS), label="value")
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        write_valid(root, fmt)
        (root / name).write_bytes("".join(sep.join(r) + "\n" for r in rows).encode(encoding))
        raw = load_or_data_error(fmt, root)
    value = rows[i][j]
    if raw is not None and name in ("interactions.csv", "inter.csv", "u.data") and j < 2 and value.isdigit():
        ids = raw.interactions.user if j == 0 else raw.interactions.item
        assert value in [str(v) for v in ids]  # an id that loads keeps its exact value


# ----------------------------------------------------------------------------- parquet (generic)

@FUZZ
@given(data=st.data())
def test_generic_parquet_of_any_column_types(data):
    which = data.draw(st.sampled_from(["interactions", "catalogue"]), label="file")
    columns = {"interactions": ["user_id", "item_id", "timestamp", "rating"],
               "catalogue": ["item_id", "text", "image_path"]}[which]
    damaged = data.draw(parquet_file(columns), label="parquet")
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        write_valid(root, "generic")
        (root / f"{which}.csv").unlink()
        (root / f"{which}.parquet").write_bytes(damaged)
        load_or_data_error("generic", root)


# ----------------------------------------------------------------------------- .npy features (fedmr)


@st.composite
def npy_file(draw) -> bytes:
    """A .npy file of a random dtype and shape, non-finite values, or cut / random bytes."""
    dtype = draw(st.sampled_from(["<f4", ">f4", "<f2", "<f8", ">f8", "<i8", "<u1", "?", "<c8", "<U3", "V4"]))
    shape = draw(st.sampled_from([(4, 3), (4, 3), (3, 3), (5, 2), (4,), (4, 1, 2), (0, 3), (4, 0), ()]))
    array = np.zeros(shape, dtype=dtype)
    if array.size and array.dtype.kind == "f":
        with np.errstate(over="ignore"):  # 1e300 is inf in float16/32
            array.flat[draw(st.integers(0, array.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e300]))
    if draw(st.booleans()):
        array = np.asfortranarray(array)
    sink = io.BytesIO()
    np.save(sink, array)
    data = sink.getvalue()
    kind = draw(st.sampled_from(["whole", "whole", "cut", "random", "empty"]))
    if kind == "cut":
        data = data[: draw(st.integers(0, len(data)))]
    elif kind == "random":
        data = b"\x93NUMPY" + draw(st.binary(max_size=200))
    elif kind == "empty":
        data = b""
    return data


@FUZZ
@given(data=st.data())
def test_fedmr_damaged_feature_files(data):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        write_valid(root, "fedmr")
        for name in data.draw(st.sets(st.sampled_from(["text_features.npy", "image_features.npy"]), min_size=1),
                              label="files"):
            (root / name).write_bytes(data.draw(npy_file(), label=name))
        load_or_data_error("fedmr", root)


# ----------------------------------------------------------------------------- images that are not images


@pytest.mark.parametrize("fmt", ["generic", "movielens-mm", "microlens"])
@FUZZ
@given(data=st.data())
def test_images_that_are_not_images(fmt, data):
    """Loaders list image files without decoding them; the encode stage's decoder gives each a
    status (corrupt or missing) and zero pixels, and never raises."""
    files = [data.draw(image_file(), label=name) for name in IMAGES[fmt]]
    as_folder = data.draw(st.booleans(), label="first image is a folder")
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        write_valid(root, fmt)
        for name, (content, _) in zip(IMAGES[fmt], files):
            (root / name).write_bytes(content)
        if as_folder:
            (root / IMAGES[fmt][0]).unlink()
            (root / IMAGES[fmt][0]).mkdir()
        raw = load_or_data_error(fmt, root)
        assert raw is not None  # images are not read by the loaders
        paths = {str(root / name): decodes for name, (_, decodes) in zip(IMAGES[fmt], files)}
        if as_folder:
            paths[str(root / IMAGES[fmt][0])] = "folder"
        pixels, status = decode_images(list(raw.catalogue.image), 16)
    for path, state, image in zip(raw.catalogue.image, status, pixels):
        expected = paths.get(path, "no file")
        if expected in ("no file", "folder"):
            assert state == MISSING
        elif expected is not None:  # None: one flipped byte, which may or may not still decode
            assert state == (OK if expected else CORRUPT)
        assert state in (OK, CORRUPT, MISSING)
        assert image.shape == (16, 16, 3) and (state == OK or not image.any())


# ----------------------------------------------------------------------------- what the fuzzing found

FOUND = [  # (file, bytes, row, reason)
    ("interactions.csv", b"\nuser_id,item_id,timestamp\n1,10,100\n", 1, "line 1 is blank; expected the header"),
    ("interactions.csv", b"\n\n\n", 1, "line 1 is blank"),
    ("interactions.csv", b"user_id,item_id,timestamp,rating\n1,10,100,1e40\n", 2, r"rating '1e40' is out of range"),
]


@pytest.mark.parametrize("name, content, row, reason", FOUND)
def test_found_by_fuzzing_text(name, content, row, reason):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / name).write_bytes(content)
        with pytest.raises(DataError, match=reason) as error:
            loaders.load("generic", d)
    assert Path(error.value.file).name == name and error.value.row == row


@pytest.mark.parametrize("columns, names, reason", [
    ([[1, 2], [1, 2], [10, 11], [5, 6]], ["user_id", "user_id", "item_id", "timestamp"],
     r"duplicate column name\(s\) user_id$"),
    ([pa.array([1, 2**63], pa.uint64()), [10, 11], [5, 6]], ["user_id", "item_id", "timestamp"],
     "id 9223372036854775808 does not fit in int64"),
])
def test_found_by_fuzzing_parquet(columns, names, reason):
    with tempfile.TemporaryDirectory() as d:
        pq.write_table(pa.Table.from_arrays([pa.array(c) for c in columns], names=names),
                       Path(d) / "interactions.parquet")
        with pytest.raises(DataError, match=reason):
            loaders.load("generic", d)
