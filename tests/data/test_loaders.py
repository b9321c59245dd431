"""Loaders on small valid inputs written to tmp_path: values, dtypes, order, options."""

from __future__ import annotations

import re
import string
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.data import loaders
from pipeline.data.loaders import _read, fedmr, generic, microlens, movielens
from pipeline.data.schema import TEST, TRAIN, VALID, DataError

# ----------------------------------------------------------------------------- writers


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def fedmr_dir(root: Path, rows: str, *, n_items: int | None = 4, d: int = 3, dtype=np.float16) -> Path:
    write(root / "inter.csv", rows)
    if n_items is not None:
        rng = np.random.default_rng(0)
        np.save(root / "text_features.npy", rng.normal(size=(n_items, d)).astype(dtype))
        np.save(root / "image_features.npy", rng.normal(size=(n_items, d + 1)).astype(dtype))
    return root


KU_LIKE = (
    "userID,itemID,rating,timestamp,split_label\n"
    "0,3,1.0,100,0\n"
    "0,1,1.0,50,0\n"
    "0,2,1.0,200,1\n"
    "0,0,1.0,300,2\n"
    "1,0,4.5,10,0\n"
)


def movielens_dir(root: Path) -> Path:
    write(root / "u.data", "1\t10\t5\t881250949\n2\t10\t3\t881250950\n1\t20\t4\t881250951\n2\t30\t1\t1\n")
    write(root / "u.item", "10|Alpha (1995)|01-Jan-1995||http://x|0|1\n20|Béta (1996)|01-Jan-1996||http://y|1|0\n"
          "30|Gamma (1997)|01-Jan-1997||http://z|0|0\n".encode("latin-1"))
    write(root / "items_tmdb.csv", 'movie_id,title,overview,year\n10,Alpha,"First, plot.",1995\n'
          '20,Beta,,1996\n10,Alpha,"First, plot.",1995\n')
    write(root / "posters" / "10.jpg", b"\xff\xd8jpeg")
    write(root / "posters" / "30.jpg", b"\xff\xd8jpeg")
    return root


# ----------------------------------------------------------------------------- dispatcher


def test_formats_and_dispatch(tmp_path):
    assert loaders.FORMATS == ("fedmr", "movielens-mm", "microlens", "generic")
    ds = loaders.load("fedmr", fedmr_dir(tmp_path, KU_LIKE))
    assert len(ds.interactions) == 5 and ds.source["format"] == "fedmr"


def test_unknown_format_names_valid_ones():
    with pytest.raises(DataError, match=r"'mmrec'.*fedmr, movielens-mm, microlens, generic"):
        loaders.load("mmrec", "/nowhere")


def test_unknown_option_is_refused(tmp_path):
    with pytest.raises(TypeError):
        loaders.load("fedmr", fedmr_dir(tmp_path, KU_LIKE), rating_threshold=4)


# ----------------------------------------------------------------------------- fedmr


def test_fedmr_values_dtypes_and_file_order(tmp_path):
    ds = fedmr.load(fedmr_dir(tmp_path, KU_LIKE))
    inter = ds.interactions
    np.testing.assert_array_equal(inter.user, [0, 0, 0, 0, 1])
    np.testing.assert_array_equal(inter.item, [3, 1, 2, 0, 0])
    np.testing.assert_array_equal(inter.timestamp, [100, 50, 200, 300, 10])
    np.testing.assert_array_equal(inter.split, [TRAIN, TRAIN, VALID, TEST, TRAIN])
    assert inter.user.dtype == np.int64 and inter.item.dtype == np.int64
    assert inter.timestamp.dtype == np.int64
    assert inter.rating.dtype == np.float32 and inter.rating[-1] == 4.5
    assert inter.split.dtype == np.int8
    assert ds.catalogue is None and ds.name == tmp_path.name
    assert ds.source["dropped_missing"] == 0 and ds.source["rows_read"] == 5


def test_fedmr_features_cast_to_float32_with_arange_ids(tmp_path):
    ds = fedmr.load(fedmr_dir(tmp_path, KU_LIKE, n_items=6))
    f = ds.features
    np.testing.assert_array_equal(f.item_id, np.arange(6))
    assert f.shapes() == {"text": [6, 3], "image": [6, 4]}
    assert all(m.dtype == np.float32 for m in f.matrices.values())
    raw = np.load(tmp_path / "text_features.npy")
    np.testing.assert_array_equal(f.matrices["text"], raw.astype(np.float32))


def test_fedmr_single_modality_and_no_features(tmp_path):
    fedmr_dir(tmp_path / "a", KU_LIKE)
    (tmp_path / "a" / "image_features.npy").unlink()
    assert list(fedmr.load(tmp_path / "a").features.matrices) == ["text"]
    assert fedmr.load(fedmr_dir(tmp_path / "b", KU_LIKE, n_items=None)).features is None


def test_fedmr_without_rating_or_split_and_x_label_alias(tmp_path):
    ds = fedmr.load(fedmr_dir(tmp_path / "a", "userID,itemID,timestamp\n0,1,5\n", n_items=None))
    assert ds.interactions.rating is None and ds.interactions.split is None
    ds = fedmr.load(fedmr_dir(tmp_path / "b", "userID,itemID,rating,timestamp,x_label\n0,1,1,5,2\n", n_items=None))
    np.testing.assert_array_equal(ds.interactions.split, [TEST])


def test_fedmr_float_timestamps_become_float64(tmp_path):
    ds = fedmr.load(fedmr_dir(tmp_path, "userID,itemID,rating,timestamp\n0,1,1,5.5\n0,2,1,1e3\n", n_items=None))
    assert ds.interactions.timestamp.dtype == np.float64
    np.testing.assert_array_equal(ds.interactions.timestamp, [5.5, 1000.0])


def test_fedmr_drops_rows_with_missing_fields_and_counts_them(tmp_path):
    rows = "userID,itemID,rating,timestamp,split_label\n0,1,1,5,0\n,2,1,6,0\n0,,1,7,0\n0,3,1,,0\n\n1,1,1,9,2\n"
    with pytest.raises(DataError, match=r"row 3, column 'userID': empty userID \(3 such rows in all\); .*skip_missing"):
        fedmr.load(fedmr_dir(tmp_path, rows))  # refused unless asked to skip
    ds = fedmr.load(fedmr_dir(tmp_path, rows), skip_missing=True)
    np.testing.assert_array_equal(ds.interactions.item, [1, 1])
    assert ds.source["dropped_missing"] == 3


def test_fedmr_allow_duplicates_keeps_them(tmp_path):
    rows = "userID,itemID,rating,timestamp\n0,1,1,5\n0,1,1,5\n0,2,1,6\n"
    ds = fedmr.load(fedmr_dir(tmp_path, rows), allow_duplicates=True)
    np.testing.assert_array_equal(ds.interactions.item, [1, 1, 2])


def test_fedmr_same_pair_other_timestamp_is_not_a_duplicate(tmp_path):
    rows = "userID,itemID,rating,timestamp\n0,1,1,5\n0,1,1,6\n"
    assert len(fedmr.load(fedmr_dir(tmp_path, rows)).interactions) == 2


def test_fedmr_tolerates_whitespace_and_crlf(tmp_path):
    rows = "userID,itemID,rating,timestamp\r\n 0 , 1 ,1, 5\r\n0,2,1,6\r\n"
    ds = fedmr.load(fedmr_dir(tmp_path, rows))
    np.testing.assert_array_equal(ds.interactions.item, [1, 2])


def test_fedmr_bom_and_padded_header(tmp_path):
    rows = "\ufeffuserID , itemID,rating,timestamp\n0,1,1,5\n"
    assert len(fedmr.load(fedmr_dir(tmp_path, rows, n_items=None)).interactions) == 1


def test_fedmr_ragged_and_whitespace_lines(tmp_path):
    """Short rows and whitespace-only lines take the exact reader; a short row is refused as cut
    short, or with skip_missing counted as missing."""
    rows = "userID,itemID,rating,timestamp\n0,1,1,5\n   \n0,2\n0,3,1,7\n"
    with pytest.raises(DataError, match=r"row 4, column 'timestamp': the line has 2 of 4 fields \(cut short\?\)"):
        fedmr.load(fedmr_dir(tmp_path, rows, n_items=None))
    ds = fedmr.load(fedmr_dir(tmp_path, rows, n_items=None), skip_missing=True)
    np.testing.assert_array_equal(ds.interactions.item, [1, 3])
    assert ds.source["dropped_missing"] == 1


# ----------------------------------------------------------------------------- movielens


def test_movielens_interactions(tmp_path):
    ds = movielens.load(movielens_dir(tmp_path))
    inter = ds.interactions
    np.testing.assert_array_equal(inter.user, [1, 2, 1, 2])
    np.testing.assert_array_equal(inter.item, [10, 10, 20, 30])
    np.testing.assert_array_equal(inter.rating, [5, 3, 4, 1])
    assert inter.rating.dtype == np.float32 and inter.timestamp.dtype == np.int64
    assert inter.split is None and ds.features is None


def test_movielens_catalogue_text_and_posters(tmp_path):
    root = movielens_dir(tmp_path)
    cat = movielens.load(root).catalogue
    np.testing.assert_array_equal(cat.item_id, [10, 20, 30])
    assert list(cat.text) == ["Alpha (1995). First, plot.", "Béta (1996).", "Gamma (1997)."]
    assert list(cat.image) == [str(root / "posters" / "10.jpg"), "", str(root / "posters" / "30.jpg")]
    assert all(Path(p).is_absolute() for p in cat.image if p)


def test_movielens_tmdb_duplicates_are_deduped(tmp_path):
    ds = movielens.load(movielens_dir(tmp_path))
    assert ds.source["tmdb_rows"] == 3 and ds.source["tmdb_duplicate_rows"] == 1


def test_movielens_without_tmdb_or_posters(tmp_path):
    root = movielens_dir(tmp_path)
    (root / "items_tmdb.csv").unlink()
    for p in (root / "posters").iterdir():
        p.unlink()
    cat = movielens.load(root).catalogue
    assert list(cat.text) == ["Alpha (1995).", "Béta (1996).", "Gamma (1997)."]
    assert list(cat.image) == ["", "", ""]


@pytest.mark.parametrize(
    "threshold, items", [(None, [10, 10, 20, 30]), (4, [10, 20]), (3.5, [10, 20]), (1, [10, 10, 20, 30])]
)
def test_movielens_rating_threshold(tmp_path, threshold, items):
    ds = movielens.load(movielens_dir(tmp_path), rating_threshold=threshold)
    np.testing.assert_array_equal(ds.interactions.item, items)
    assert ds.source["dropped_below_threshold"] == 4 - len(items)


@pytest.mark.parametrize("bad", ["4", float("nan"), True])
def test_movielens_bad_threshold_is_refused(tmp_path, bad):
    with pytest.raises(ValueError, match="rating_threshold"):
        movielens.load(movielens_dir(tmp_path), rating_threshold=bad)


# ----------------------------------------------------------------------------- microlens


def microlens_dir(root: Path, pairs: str, titles: str | None = "item,title\n5,Five\n6,\"Six, six\"\n7,Seven\n") -> Path:
    write(root / "MicroLens-50k_pairs.tsv", pairs)
    if titles is not None:
        write(root / "MicroLens-50k_titles.csv", titles)
    return root


def test_microlens_positions_are_timestamps(tmp_path):
    ds = microlens.load(microlens_dir(tmp_path, "1\t5 6 7\n2\t7\n3\t6  5\n"))
    inter = ds.interactions
    np.testing.assert_array_equal(inter.user, [1, 1, 1, 2, 3, 3])
    np.testing.assert_array_equal(inter.item, [5, 6, 7, 7, 6, 5])
    np.testing.assert_array_equal(inter.timestamp, [0, 1, 2, 0, 0, 1])
    assert inter.user.dtype == inter.item.dtype == inter.timestamp.dtype == np.int64
    assert ds.name == "MicroLens-50k"


def test_microlens_crlf_and_no_trailing_newline(tmp_path):
    a = microlens.load(microlens_dir(tmp_path / "a", "1\t5 6\r\n2\t7\r\n")).interactions
    b = microlens.load(microlens_dir(tmp_path / "b", "1\t5 6\n2\t7")).interactions
    for x, y in ((a.user, b.user), (a.item, b.item), (a.timestamp, b.timestamp)):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a.item, [5, 6, 7])


def test_microlens_catalogue_and_images(tmp_path):
    root = microlens_dir(tmp_path, "1\t5 6\n")
    write(root / "images" / "6.jpg", b"jpeg")
    cat = microlens.load(root).catalogue
    np.testing.assert_array_equal(cat.item_id, [5, 6, 7])
    assert list(cat.text) == ["Five", "Six, six", "Seven"]
    assert list(cat.image) == ["", str(root / "images" / "6.jpg"), ""]


def test_microlens_explicit_files_and_no_titles(tmp_path):
    root = microlens_dir(tmp_path, "1\t5 6\n")
    ds = microlens.load(pairs=root / "MicroLens-50k_pairs.tsv", titles=root / "MicroLens-50k_titles.csv")
    assert len(ds.catalogue) == 3
    ds = loaders.load("microlens", pairs=root / "MicroLens-50k_pairs.tsv")
    assert ds.catalogue is None and len(ds.interactions) == 2


def test_microlens_drops_lines_with_empty_user_or_items(tmp_path):
    ds = microlens.load(microlens_dir(tmp_path, "1\t5 6\n\t7\n2\t\n3\t7\n"), skip_missing=True)
    np.testing.assert_array_equal(ds.interactions.user, [1, 1, 3])
    assert ds.source["dropped_missing"] == 2


def test_microlens_refuses_both_directory_and_files(tmp_path):
    root = microlens_dir(tmp_path, "1\t5\n")
    with pytest.raises(TypeError):
        microlens.load(root, pairs=root / "MicroLens-50k_pairs.tsv")


# ----------------------------------------------------------------------------- generic


def test_generic_integer_ids_and_catalogue_paths(tmp_path):
    write(tmp_path / "interactions.csv", "user_id,item_id,timestamp,rating,extra\n3,10,5,1,x\n1,11,6,0.5,y\n")
    write(tmp_path / "catalogue.csv",
          f"item_id,text,image_path\n10,ten,img/10.png\n11,,\n12,twelve,{tmp_path}/abs.png\n")
    ds = generic.load(tmp_path)
    np.testing.assert_array_equal(ds.interactions.user, [3, 1])
    assert ds.interactions.item.dtype == np.int64 and ds.interactions.rating.dtype == np.float32
    assert list(ds.catalogue.text) == ["ten", "", "twelve"]
    assert list(ds.catalogue.image) == [str(tmp_path / "img" / "10.png"), "", f"{tmp_path}/abs.png"]


def test_generic_string_ids_stay_strings(tmp_path):
    write(tmp_path / "interactions.csv", "user_id,item_id,timestamp\nalice,v1.5,5\nbob,007,6\n42,x,7\n")
    inter = generic.load(tmp_path).interactions
    assert inter.user.dtype == object and list(inter.user) == ["alice", "bob", "42"]
    assert list(inter.item) == ["v1.5", "007", "x"]
    assert all(type(v) is str for v in inter.user)


def test_generic_item_type_is_shared_with_catalogue(tmp_path):
    write(tmp_path / "interactions.csv", "user_id,item_id,timestamp\n1,10,5\n")
    write(tmp_path / "catalogue.csv", "item_id,text\n10,ten\nx11,eleven\n")
    ds = generic.load(tmp_path)
    assert list(ds.interactions.item) == ["10"] and list(ds.catalogue.item_id) == ["10", "x11"]
    assert ds.interactions.user.dtype == np.int64


def test_generic_explicit_files_and_parquet(tmp_path):
    when = pd.to_datetime(["2020-01-01", "2020-01-02"])
    df = pd.DataFrame({"user_id": [1, 2], "item_id": ["a", "b"], "timestamp": when})
    df.to_parquet(tmp_path / "log.parquet")
    pd.DataFrame({"item_id": ["a"], "text": ["A"], "image_path": [None]}).to_parquet(tmp_path / "cat.parquet")
    ds = loaders.load("generic", interactions=tmp_path / "log.parquet", catalogue=tmp_path / "cat.parquet")
    assert ds.interactions.timestamp.dtype == np.int64
    assert ds.interactions.timestamp[1] > ds.interactions.timestamp[0]
    assert list(ds.catalogue.image) == [""] and ds.interactions.rating is None and ds.name == "log"


def test_generic_parquet_nulls_are_dropped(tmp_path):
    df = pd.DataFrame({"user_id": [1, None, 3], "item_id": [1, 2, 3], "timestamp": [1.0, 2.0, None]})
    df.to_parquet(tmp_path / "interactions.parquet")
    with pytest.raises(DataError, match="empty user_id"):
        generic.load(tmp_path)
    ds = generic.load(tmp_path, skip_missing=True)
    np.testing.assert_array_equal(ds.interactions.user, [1])
    assert ds.interactions.user.dtype == np.int64 and ds.source["dropped_missing"] == 2


def test_generic_parquet_keeps_large_ids_exact_and_ignores_extra_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    big = 2**60 + 1  # not representable in float64
    table = pa.table({
        "user_id": pa.array([big, None, 5], pa.int64()),
        "item_id": pa.array([1, 2, 3], pa.uint32()),
        "timestamp": pa.array([10, 20, 30], pa.int64()),
        "flag": pa.array([True, False, True]),
    })
    pq.write_table(table, tmp_path / "interactions.parquet")
    inter = generic.load(tmp_path, skip_missing=True).interactions
    assert inter.user.tolist() == [big, 5] and inter.item.tolist() == [1, 3]


def test_generic_tsv_explicit(tmp_path):
    write(tmp_path / "log.tsv", "user_id\titem_id\ttimestamp\n1\t2\t3\n")
    assert len(generic.load(interactions=tmp_path / "log.tsv").interactions) == 1


# ----------------------------------------------------------------------------- properties

_ID_TEXT = (
    st.text(alphabet=string.ascii_letters + string.digits + "_,.\"' ", min_size=1, max_size=6)
    .map(str.strip)
    .filter(lambda s: s != "" and not s.lstrip("+-").isdigit())
    .filter(lambda s: not re.fullmatch(_read._FLOAT_RE, s))  # decimal numbers are refused as ids, not names
)
_INT_IDS = st.integers(0, 2**62)
_ROWS = st.lists(
    st.tuples(
        st.one_of(_INT_IDS, _ID_TEXT),
        st.one_of(_INT_IDS, _ID_TEXT),
        st.one_of(st.integers(-(2**53), 2**53), st.integers(-4000, 4000).map(lambda k: k / 4)),
        st.integers(0, 10).map(lambda k: k / 2),
    ),
    min_size=1,
    max_size=25,
)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer))


def _expected_ids(values: list) -> np.ndarray:
    if all(_is_int(v) for v in values):
        return np.array(values, dtype=np.int64)
    return np.array([str(v) for v in values], dtype=object)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=_ROWS, fmt=st.sampled_from(["csv", "parquet"]))
def test_generic_round_trip(rows, fmt):
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"])
    key = pd.DataFrame({"u": df.user_id.astype(str), "i": df.item_id.astype(str), "t": df.timestamp.astype(float)})
    df = df[~key.duplicated()]
    if fmt == "parquet":  # parquet needs one type per column, as real writers produce
        for c in ("user_id", "item_id"):
            if not all(_is_int(v) for v in df[c]):
                df[c] = df[c].astype(str)
    with tempfile.TemporaryDirectory() as d:
        if fmt == "csv":
            df.to_csv(Path(d) / "interactions.csv", index=False)
        else:
            df.to_parquet(Path(d) / "interactions.parquet", index=False)
        inter = generic.load(d).interactions
    for col, got in (("user_id", inter.user), ("item_id", inter.item)):
        want = _expected_ids(list(df[col]))
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    ts = list(df["timestamp"])
    if all(_is_int(t) for t in ts):
        assert inter.timestamp.dtype == np.int64
    np.testing.assert_array_equal(inter.timestamp, np.array(ts, dtype=inter.timestamp.dtype))
    np.testing.assert_array_equal(inter.rating, df["rating"].to_numpy(dtype=np.float32))


@settings(max_examples=60, deadline=None)
@given(
    notes=st.lists(st.text(alphabet="ab \n,\"", max_size=8), min_size=1, max_size=15),
    blanks=st.lists(st.booleans(), min_size=15, max_size=15),
    bad=st.integers(0, 14),
    crlf=st.booleans(),
    ragged=st.booleans(),
)
def test_error_row_is_the_editor_line(notes, blanks, bad, crlf, ragged):
    """Quoted newlines and blank lines must not shift the reported line number, whichever
    reader runs (a ragged row sends the file to the exact reader)."""
    bad = bad % len(notes)
    lines, expected = ["user_id,item_id,timestamp,note"], None
    if ragged:
        lines.append("7,7")
    for k, note in enumerate(notes):
        if blanks[k]:
            lines.append("")
        if k == bad:  # editor line = newlines before this record + 1
            expected = sum(s.count("\n") for s in lines) + len(lines) + 1
        ts = "x" if k == bad else str(k)
        quoted = '"' + note.replace('"', '""') + '"'
        lines.append(f"{k},{k},{ts},{quoted}")
    eol = "\r\n" if crlf else "\n"
    text = eol.join(lines) + eol
    with tempfile.TemporaryDirectory() as d:
        write(Path(d) / "interactions.csv", text)
        with pytest.raises(DataError) as err:
            generic.load(d, skip_missing=True)  # the ragged row is dropped, the bad timestamp refused
    assert err.value.row == expected and err.value.column == "timestamp"


def test_generic_reads_what_the_synthetic_generator_writes(tmp_path):
    synthetic = pytest.importorskip("pipeline.data.synthetic")
    data = synthetic.generate(synthetic.SyntheticConfig(n_users=40, n_items=20, image_size=16), progress=False)
    folder = synthetic.write(data, tmp_path / "synth", progress=False)
    ds = generic.load(folder)
    want, got = data.dataset.interactions, ds.interactions
    for a, b in ((want.user, got.user), (want.item, got.item), (want.timestamp, got.timestamp)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ds.catalogue.item_id, data.dataset.catalogue.item_id)
    assert list(ds.catalogue.text) == list(data.dataset.catalogue.text)
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in ds.catalogue.image)
