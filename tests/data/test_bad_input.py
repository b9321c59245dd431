"""Every bad input raises DataError naming the file, the editor line and/or the column.

One test per failure case per format; fixtures are written to tmp_path.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.data.loaders import fedmr, generic, microlens, movielens
from pipeline.data.schema import DataError

BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00" + bytes(range(256)) * 4
NOT_UTF8 = b"userID,itemID,rating,timestamp\n0,\xff\xfe\xfa,1,5\n"


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def expect(fn, *, file: str, reason: str, row: int | None = None, column: str | None = None) -> DataError:
    """Run fn, which must raise DataError on `file` (a name) at `row`/`column` with `reason` (regex)."""
    with pytest.raises(DataError) as info:
        fn()
    err = info.value
    assert Path(err.file).name == file, str(err)
    assert (err.row, err.column) == (row, column), str(err)
    assert re.search(reason, err.reason), str(err)
    assert str(err).startswith(err.file)
    return err


# ============================================================================= fedmr

HEADER = "userID,itemID,rating,timestamp,split_label\n"
GOOD = HEADER + "0,1,1,10,0\n0,2,1,20,1\n0,3,1,30,2\n"


def ku(tmp_path: Path, inter: str | bytes = GOOD, n_items: int | None = 4, text=None, image=None) -> Path:
    write(tmp_path / "inter.csv", inter)
    if n_items is not None:
        ones = np.ones((n_items, 3), dtype=np.float16)
        np.save(tmp_path / "text_features.npy", ones if text is None else text)
        np.save(tmp_path / "image_features.npy", ones if image is None else image)
    return tmp_path


def test_fedmr_missing_directory(tmp_path):
    expect(lambda: fedmr.load(tmp_path / "nope"), file="nope", reason="directory not found")


def test_fedmr_path_is_a_file(tmp_path):
    write(tmp_path / "f", "x")
    expect(lambda: fedmr.load(tmp_path / "f"), file="f", reason="expected a directory")


def test_fedmr_missing_inter_csv(tmp_path):
    expect(lambda: fedmr.load(tmp_path), file="inter.csv", reason="file not found")


def test_fedmr_inter_csv_is_a_directory(tmp_path):
    (tmp_path / "inter.csv").mkdir()
    expect(lambda: fedmr.load(tmp_path), file="inter.csv", reason="expected a file, found a directory")


def test_fedmr_binary_inter_csv(tmp_path):
    expect(lambda: fedmr.load(ku(tmp_path, BINARY)), file="inter.csv", reason="binary content")


def test_fedmr_not_utf8(tmp_path):
    expect(lambda: fedmr.load(ku(tmp_path, NOT_UTF8)), file="inter.csv", reason="not valid utf-8")


def test_fedmr_row_with_extra_fields(tmp_path):
    inter = HEADER + "0,1,1,10,0\n0,2,1,20,1,9\n"
    expect(lambda: fedmr.load(ku(tmp_path, inter)), file="inter.csv", row=3, reason="Expected 5 fields.*saw 6")


def test_fedmr_every_row_has_an_extra_leading_field(tmp_path):
    inter = HEADER + "9,0,1,1,10,0\n9,0,2,1,20,1\n"
    expect(lambda: fedmr.load(ku(tmp_path, inter)), file="inter.csv", row=2, reason="more fields than the header")


def test_fedmr_zero_byte_file(tmp_path):
    expect(lambda: fedmr.load(ku(tmp_path, b"")), file="inter.csv", reason=r"empty \(0 bytes\)")


def test_fedmr_header_only(tmp_path):
    expect(lambda: fedmr.load(ku(tmp_path, HEADER)), file="inter.csv", reason=r"no data rows \(header only\)")


def test_fedmr_duplicate_column_names(tmp_path):
    inter = "userID,itemID,rating,timestamp,itemID\n0,1,1,10,2\n"
    expect(lambda: fedmr.load(ku(tmp_path, inter)), file="inter.csv", row=1, reason="duplicate column name.*itemID")


def test_fedmr_missing_column(tmp_path):
    inter = "user,itemID,rating,timestamp\n0,1,1,10\n"
    expect(lambda: fedmr.load(ku(tmp_path, inter)), file="inter.csv", row=1, column="userID",
           reason="missing required column.*userID.*found: user, itemID")


def test_fedmr_missing_two_columns_names_both(tmp_path):
    inter = "userID,rating\n0,1\n"
    expect(lambda: fedmr.load(ku(tmp_path, inter)), file="inter.csv", row=1, reason="itemID, timestamp")


@pytest.mark.parametrize("value", ["abc", "1.5", "1e3", "0x1", "١٢", "1_000"])
def test_fedmr_non_integer_user(tmp_path, value):
    inter = HEADER + f"0,1,1,10,0\n{value},2,1,20,1\n"
    expect(lambda: fedmr.load(ku(tmp_path, inter)), file="inter.csv", row=3, column="userID",
           reason=f"id '{re.escape(value)}' is not an integer")


def test_fedmr_non_integer_item(tmp_path):
    inter = HEADER + "0,1,1,10,0\n0,2,1,20,1\n\n0,two,1,30,2\n"
    expect(lambda: fedmr.load(ku(tmp_path, inter)), file="inter.csv", row=5, column="itemID", reason="not an integer")


def test_fedmr_id_too_large(tmp_path):
    inter = HEADER + "99999999999999999999,1,1,10,0\n"
    expect(lambda: fedmr.load(ku(tmp_path, inter)), file="inter.csv", row=2, column="userID",
           reason="does not fit in int64")


@pytest.mark.parametrize("column", ["userID", "itemID"])
def test_fedmr_negative_id(tmp_path, column):
    row = "-1,1,1,20,1" if column == "userID" else "0,-2,1,20,1"
    inter = HEADER + f"0,1,1,10,0\n{row}\n"
    expect(lambda: fedmr.load(ku(tmp_path, inter)), file="inter.csv", row=3, column=column, reason="negative id -")


def test_fedmr_item_out_of_feature_range(tmp_path):
    inter = GOOD + "1,4,1,40,0\n"
    expect(lambda: fedmr.load(ku(tmp_path, inter, n_items=4)), file="inter.csv", row=5, column="itemID",
           reason="itemID 4 out of range: feature matrices have 4 rows")


def test_fedmr_duplicate_rows(tmp_path):
    inter = GOOD + "1,2,1,50,0\n0,2,1,20,1\n"
    err = expect(lambda: fedmr.load(ku(tmp_path, inter)), file="inter.csv", row=6,
                 reason=r"duplicate interaction \(user=0, item=2, timestamp=20\) of row 3.*allow_duplicates")
    assert "row 6" in str(err) and "row 3" in str(err)
    assert len(fedmr.load(tmp_path, allow_duplicates=True).interactions) == 5


def test_fedmr_duplicates_compare_parsed_values(tmp_path):
    inter = HEADER + "0,1,1,10,0\n00,+1,1,10,0\n"
    expect(lambda: fedmr.load(ku(tmp_path, inter)), file="inter.csv", row=3, reason="of row 2")


@pytest.mark.parametrize("label", ["3", "-1", "a", "1.0"])
def test_fedmr_bad_split_label(tmp_path, label):
    inter = HEADER + f"0,1,1,10,0\n0,2,1,20,{label}\n"
    expect(lambda: fedmr.load(ku(tmp_path, inter)), file="inter.csv", row=3, column="split_label",
           reason="not one of 0, 1, 2")


def test_fedmr_empty_split_label(tmp_path):
    inter = HEADER + "0,1,1,10,\n"
    expect(lambda: fedmr.load(ku(tmp_path, inter)), file="inter.csv", row=2, column="split_label", reason="''")


@pytest.mark.parametrize("value", ["abc", "2020-01-01", "inf", "nan"])
def test_fedmr_timestamp_not_numeric(tmp_path, value):
    inter = HEADER + f"0,1,1,10,0\n0,2,1,{value},1\n"
    expect(lambda: fedmr.load(ku(tmp_path, inter)), file="inter.csv", row=3, column="timestamp",
           reason="timestamp .* is not a finite number")


@pytest.mark.parametrize("value, reason", [("good", "rating 'good' is not a finite number"), ("", "empty rating")])
def test_fedmr_bad_rating(tmp_path, value, reason):
    inter = HEADER + f"0,1,{value},10,0\n"
    expect(lambda: fedmr.load(ku(tmp_path, inter)), file="inter.csv", row=2, column="rating", reason=reason)


def test_fedmr_every_row_dropped(tmp_path):
    inter = HEADER + ",1,1,10,0\n0,,1,20,1\n0,3,1,,2\n"
    expect(lambda: fedmr.load(ku(tmp_path, inter), skip_missing=True), file="inter.csv",
           reason="no usable rows: all 3 rows")


def test_fedmr_feature_file_not_npy(tmp_path):
    ku(tmp_path)
    write(tmp_path / "text_features.npy", BINARY)
    expect(lambda: fedmr.load(tmp_path), file="text_features.npy", reason=r"not a \.npy file \(no NUMPY header\)")


def test_fedmr_feature_file_truncated(tmp_path):
    ku(tmp_path)
    data = (tmp_path / "image_features.npy").read_bytes()
    write(tmp_path / "image_features.npy", data[:-5])
    expect(lambda: fedmr.load(tmp_path), file="image_features.npy", reason="cannot load .npy file.*could only read")


def test_fedmr_feature_file_is_a_directory(tmp_path):
    ku(tmp_path, n_items=None)
    (tmp_path / "text_features.npy").mkdir()
    expect(lambda: fedmr.load(tmp_path), file="text_features.npy", reason="found a directory")


def test_fedmr_feature_file_is_npz(tmp_path):
    ku(tmp_path, n_items=None)
    with open(tmp_path / "text_features.npy", "wb") as f:
        np.savez(f, a=np.ones((4, 3)))
    expect(lambda: fedmr.load(tmp_path), file="text_features.npy", reason="npz archive")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_fedmr_non_finite_feature_row(tmp_path, bad):
    text = np.ones((4, 3), dtype=np.float32)
    text[2, 1] = bad
    expect(lambda: fedmr.load(ku(tmp_path, text=text)), file="text_features.npy",
           reason=r"NaN or inf in feature row 2 \(0-based, = item id 2\)")


def test_fedmr_float64_overflowing_float32_is_non_finite(tmp_path):
    image = np.ones((4, 3), dtype=np.float64)
    image[3, 0] = 1e300
    expect(lambda: fedmr.load(ku(tmp_path, image=image)), file="image_features.npy", reason="feature row 3")


def test_fedmr_feature_row_counts_disagree(tmp_path):
    expect(lambda: fedmr.load(ku(tmp_path, text=np.ones((5, 3), np.float16))), file="image_features.npy",
           reason="row counts disagree: text_features.npy has 5, image_features.npy has 4")


@pytest.mark.parametrize("shape", [(4,), (4, 3, 2)])
def test_fedmr_features_not_2d(tmp_path, shape):
    expect(lambda: fedmr.load(ku(tmp_path, text=np.ones(shape, np.float32))), file="text_features.npy",
           reason=r"shape \[.*\]; expected 2-D")


def test_fedmr_features_object_array(tmp_path):
    text = np.array([[1, "a"]] * 4, dtype=object)
    ku(tmp_path)
    np.save(tmp_path / "text_features.npy", text, allow_pickle=True)
    expect(lambda: fedmr.load(tmp_path), file="text_features.npy", reason="cannot load .npy file.*allow_pickle")


def test_fedmr_features_not_float(tmp_path):
    expect(lambda: fedmr.load(ku(tmp_path, image=np.ones((4, 3), np.int32))), file="image_features.npy",
           reason="dtype int32")


def test_fedmr_features_empty(tmp_path):
    expect(lambda: fedmr.load(ku(tmp_path, text=np.ones((4, 0), np.float32))), file="text_features.npy",
           reason="empty")


# ============================================================================= movielens

U_DATA = "1\t10\t5\t100\n2\t10\t3\t101\n1\t20\t4\t102\n"
U_ITEM = "10|Alpha (1995)|x||u|0\n20|Beta (1996)|x||u|1\n"
TMDB = "movie_id,title,overview\n10,Alpha,plot A\n20,Beta,plot B\n"


def ml(tmp_path: Path, data: str | bytes = U_DATA, item: str | bytes = U_ITEM, tmdb: str | bytes | None = TMDB) -> Path:
    write(tmp_path / "u.data", data)
    write(tmp_path / "u.item", item)
    if tmdb is not None:
        write(tmp_path / "items_tmdb.csv", tmdb)
    return tmp_path


def test_movielens_missing_directory(tmp_path):
    expect(lambda: movielens.load(tmp_path / "ml"), file="ml", reason="directory not found")


@pytest.mark.parametrize("name", ["u.data", "u.item"])
def test_movielens_missing_file(tmp_path, name):
    ml(tmp_path)
    (tmp_path / name).unlink()
    expect(lambda: movielens.load(tmp_path), file=name, reason="file not found")


@pytest.mark.parametrize("name", ["u.data", "u.item", "items_tmdb.csv"])
def test_movielens_zero_byte_file(tmp_path, name):
    ml(tmp_path)
    write(tmp_path / name, b"")
    expect(lambda: movielens.load(tmp_path), file=name, reason=r"empty \(0 bytes\)")


@pytest.mark.parametrize("name", ["u.data", "u.item", "items_tmdb.csv"])
def test_movielens_binary_file(tmp_path, name):
    ml(tmp_path)
    write(tmp_path / name, BINARY)
    expect(lambda: movielens.load(tmp_path), file=name, reason="binary content")


def test_movielens_u_data_is_a_directory(tmp_path):
    ml(tmp_path)
    (tmp_path / "u.data").unlink()
    (tmp_path / "u.data").mkdir()
    expect(lambda: movielens.load(tmp_path), file="u.data", reason="found a directory")


@pytest.mark.parametrize("data, found", [("1\t10\t5\n", 3), ("1\t10\t5\t100\t7\n", 5)])
def test_movielens_wrong_field_count(tmp_path, data, found):
    expect(lambda: movielens.load(ml(tmp_path, data)), file="u.data", row=1,
           reason=f"expected 4 tab-separated fields .*found {found}")


def test_movielens_extra_field_on_one_line(tmp_path):
    expect(lambda: movielens.load(ml(tmp_path, U_DATA + "3\t10\t1\t1\t9\n")), file="u.data", row=4,
           reason="malformed")


@pytest.mark.parametrize("line, column, reason", [
    ("x1\t10\t5\t103", "user", "not an integer"),
    ("3\t1.5\t5\t103", "item", "not an integer"),
    ("-3\t10\t5\t103", "user", "negative id -3"),
    ("3\t10\tfive\t103", "rating", "rating 'five'"),
    ("3\t10\t5\tyesterday", "timestamp", "timestamp 'yesterday'"),
    ("3\t30\t5\t103", "item", r"item 30 is not in u\.item"),
])
def test_movielens_bad_u_data_value(tmp_path, line, column, reason):
    expect(lambda: movielens.load(ml(tmp_path, U_DATA + line + "\n")), file="u.data", row=4, column=column,
           reason=reason)


def test_movielens_duplicate_ratings(tmp_path):
    data = U_DATA + "2\t10\t3\t101\n"
    expect(lambda: movielens.load(ml(tmp_path, data)), file="u.data", row=4, reason="of row 2")
    assert len(movielens.load(tmp_path, allow_duplicates=True).interactions) == 4


def test_movielens_every_row_dropped(tmp_path):
    expect(lambda: movielens.load(ml(tmp_path, "\t10\t5\t1\n1\t\t4\t2\n"), skip_missing=True), file="u.data",
           reason="no usable rows")


def test_movielens_threshold_leaves_nothing(tmp_path):
    expect(lambda: movielens.load(ml(tmp_path), rating_threshold=6), file="u.data", reason="no ratings >= 6")


def test_movielens_u_item_too_few_fields(tmp_path):
    expect(lambda: movielens.load(ml(tmp_path, item="10\n20\n")), file="u.item", row=1,
           reason="at least 2 '|'-separated fields")


@pytest.mark.parametrize("item, row, reason", [
    (U_ITEM + "10|Again (1999)|x||u|0\n", 3, r"duplicate movie_id 10 \(also on row 1\)"),
    ("ten|Alpha|x||u|0\n", 1, "not an integer"),
    ("10|Alpha|x||u|0\n|Beta|x||u|1\n", 2, "empty movie id"),
])
def test_movielens_bad_u_item(tmp_path, item, row, reason):
    expect(lambda: movielens.load(ml(tmp_path, item=item)), file="u.item", row=row, column="movie_id", reason=reason)


def test_movielens_tmdb_missing_column(tmp_path):
    expect(lambda: movielens.load(ml(tmp_path, tmdb="movie_id,title\n10,A\n")), file="items_tmdb.csv", row=1,
           column="overview", reason="missing required column")


def test_movielens_tmdb_header_only(tmp_path):
    expect(lambda: movielens.load(ml(tmp_path, tmdb="movie_id,overview\n")), file="items_tmdb.csv",
           reason="no data rows")


def test_movielens_tmdb_conflicting_duplicate(tmp_path):
    tmdb = TMDB + "10,Alpha,plot A\n10,Alpha,another plot\n"
    expect(lambda: movielens.load(ml(tmp_path, tmdb=tmdb)), file="items_tmdb.csv", row=5, column="overview",
           reason="different overview")


def test_movielens_tmdb_bad_movie_id(tmp_path):
    expect(lambda: movielens.load(ml(tmp_path, tmdb=TMDB + "x,X,plot\n")), file="items_tmdb.csv", row=4,
           column="movie_id", reason="not an integer")


# ============================================================================= microlens

PAIRS = "1\t5 6 7\n2\t6\n"
TITLES = "item,title\n5,Five\n6,Six\n7,Seven\n"


def mic(tmp_path: Path, pairs: str | bytes = PAIRS, titles: str | bytes | None = TITLES) -> Path:
    write(tmp_path / "X_pairs.tsv", pairs)
    if titles is not None:
        write(tmp_path / "X_titles.csv", titles)
    return tmp_path


def test_microlens_missing_directory(tmp_path):
    expect(lambda: microlens.load(tmp_path / "ml"), file="ml", reason="directory not found")


def test_microlens_no_pairs_file(tmp_path):
    write(tmp_path / "X_titles.csv", TITLES)
    expect(lambda: microlens.load(tmp_path), file="*_pairs.tsv", reason="file not found")


def test_microlens_two_pairs_files(tmp_path):
    mic(tmp_path)
    write(tmp_path / "Y_pairs.tsv", PAIRS)
    expect(lambda: microlens.load(tmp_path), file=tmp_path.name,
           reason="ambiguous input: found X_pairs.tsv, Y_pairs.tsv")


@pytest.mark.parametrize("which", ["pairs", "titles"])
def test_microlens_explicit_file_missing(tmp_path, which):
    mic(tmp_path)
    files = {"pairs": tmp_path / "X_pairs.tsv", "titles": tmp_path / "X_titles.csv", which: tmp_path / "gone"}
    expect(lambda: microlens.load(**files), file="gone", reason="file not found")


@pytest.mark.parametrize("data, reason", [(b"", r"empty \(0 bytes\)"), (BINARY, "binary content"),
                                          (b"1\t\xff\xfe 6\n", "not valid utf-8")])
def test_microlens_unreadable_pairs(tmp_path, data, reason):
    expect(lambda: microlens.load(mic(tmp_path, data)), file="X_pairs.tsv", reason=reason)


def test_microlens_three_fields(tmp_path):
    expect(lambda: microlens.load(mic(tmp_path, "1\t5 6\t7\n")), file="X_pairs.tsv", row=1,
           reason="expected 2 tab-separated fields")


@pytest.mark.parametrize("pairs, row, column, reason", [
    (PAIRS + "u3\t5\n", 3, "user", "'u3' is not an integer"),
    (PAIRS + "3\t5 a6 7\n", 3, "item", "'a6' is not an integer"),
    ("1\t5\r\n\r\n3\t5 6.0\r\n", 3, "item", "'6.0' is not an integer"),
    (PAIRS + "3\t5 -6\n", 3, "item", "negative id -6"),
    (PAIRS + "-3\t5\n", 3, "user", "negative id -3"),
])
def test_microlens_bad_ids(tmp_path, pairs, row, column, reason):
    expect(lambda: microlens.load(mic(tmp_path, pairs)), file="X_pairs.tsv", row=row, column=column, reason=reason)


def test_microlens_user_on_two_lines(tmp_path):
    expect(lambda: microlens.load(mic(tmp_path, PAIRS + "3\t5\n1\t7\n")), file="X_pairs.tsv", row=4,
           column="user", reason=r"duplicate user 1 \(also on row 1\)")


def test_microlens_every_line_dropped(tmp_path):
    expect(lambda: microlens.load(mic(tmp_path, "\t5 6\n2\t\n"), skip_missing=True), file="X_pairs.tsv",
           reason="no usable rows")


@pytest.mark.parametrize("titles, row, column, reason", [
    ("item,name\n5,Five\n", 1, "title", "missing required column"),
    ("item,title\n", None, None, "no data rows"),
    (TITLES + "6,Again\n", 5, "item", r"duplicate item 6 \(also on row 3\)"),
    (TITLES + "x,Ex\n", 5, "item", "not an integer"),
    (TITLES + ",Nobody\n", 5, "item", "empty item id"),
])
def test_microlens_bad_titles(tmp_path, titles, row, column, reason):
    expect(lambda: microlens.load(mic(tmp_path, titles=titles)), file="X_titles.csv", row=row, column=column,
           reason=reason)


# ============================================================================= generic

G_HEADER = "user_id,item_id,timestamp,rating\n"
G_GOOD = G_HEADER + "1,10,100,1\n2,10,101,1\n"


def gen(tmp_path: Path, inter: str | bytes | None = G_GOOD, cat: str | bytes | None = None, ext: str = "csv") -> Path:
    if inter is not None:
        write(tmp_path / f"interactions.{ext}", inter)
    if cat is not None:
        write(tmp_path / "catalogue.csv", cat)
    return tmp_path


def to_parquet(tmp_path: Path, df: pd.DataFrame, name: str = "interactions.parquet") -> Path:
    df.to_parquet(tmp_path / name, index=False)
    return tmp_path


def test_generic_missing_directory(tmp_path):
    expect(lambda: generic.load(tmp_path / "g"), file="g", reason="directory not found")


def test_generic_no_interactions_file(tmp_path):
    expect(lambda: generic.load(tmp_path), file="interactions.csv",
           reason="file not found.*interactions.csv or interactions.parquet")


def test_generic_csv_and_parquet_both_present(tmp_path):
    gen(tmp_path)
    to_parquet(tmp_path, pd.DataFrame({"user_id": [1], "item_id": [1], "timestamp": [1]}))
    expect(lambda: generic.load(tmp_path), file=tmp_path.name, reason="ambiguous input")


@pytest.mark.parametrize("which", ["interactions", "catalogue"])
def test_generic_explicit_file_missing(tmp_path, which):
    gen(tmp_path)
    files = {"interactions": tmp_path / "interactions.csv", which: tmp_path / "gone.csv"}
    expect(lambda: generic.load(**files), file="gone.csv", reason="file not found")


def test_generic_interactions_is_a_directory(tmp_path):
    (tmp_path / "interactions.csv").mkdir()
    expect(lambda: generic.load(tmp_path), file="interactions.csv", reason="found a directory")


@pytest.mark.parametrize("data, reason", [(BINARY, "binary content"), (b"", r"empty \(0 bytes\)"),
                                          (G_HEADER.encode(), "no data rows"),
                                          (G_HEADER.encode() + b"1,\xe9,1,1\n", "not valid utf-8")])
def test_generic_unreadable_csv(tmp_path, data, reason):
    expect(lambda: generic.load(gen(tmp_path, data)), file="interactions.csv", reason=reason)


def test_generic_truncated_parquet(tmp_path):
    to_parquet(tmp_path, pd.DataFrame({"user_id": range(100), "item_id": range(100), "timestamp": range(100)}))
    data = (tmp_path / "interactions.parquet").read_bytes()
    write(tmp_path / "interactions.parquet", data[: len(data) // 2])
    expect(lambda: generic.load(tmp_path), file="interactions.parquet", reason="not a readable parquet file")


def test_generic_garbage_parquet(tmp_path):
    write(tmp_path / "interactions.parquet", BINARY)
    expect(lambda: generic.load(tmp_path), file="interactions.parquet", reason="not a readable parquet file")


def test_generic_parquet_without_rows(tmp_path):
    to_parquet(tmp_path, pd.DataFrame({"user_id": pd.Series([], dtype="int64"), "item_id": pd.Series([], dtype="int64"),
                                       "timestamp": pd.Series([], dtype="int64")}))
    expect(lambda: generic.load(tmp_path), file="interactions.parquet", reason="no data rows")


def test_generic_missing_columns_csv(tmp_path):
    expect(lambda: generic.load(gen(tmp_path, "user_id,item,time\n1,2,3\n")), file="interactions.csv", row=1,
           reason="missing required column.*item_id, timestamp")


def test_generic_missing_column_parquet(tmp_path):
    to_parquet(tmp_path, pd.DataFrame({"user_id": [1], "item_id": [1]}))
    expect(lambda: generic.load(tmp_path), file="interactions.parquet", column="timestamp",
           reason="missing required column")


@pytest.mark.parametrize("other", ["3", "bob"])
def test_generic_negative_user_in_integer_and_string_columns(tmp_path, other):
    inter = G_HEADER + f"{other},10,100,1\n-7,10,101,1\n"
    expect(lambda: generic.load(gen(tmp_path, inter)), file="interactions.csv", row=3, column="user_id",
           reason="negative id -7")


def test_generic_negative_item_among_string_ids(tmp_path):
    inter = G_HEADER + "1,a,100,1\n1,-4,101,1\n"
    expect(lambda: generic.load(gen(tmp_path, inter)), file="interactions.csv", row=3, column="item_id",
           reason="negative id -4")


def test_generic_parquet_negative_and_non_integer_ids(tmp_path):
    to_parquet(tmp_path, pd.DataFrame({"user_id": [1, -2], "item_id": [1, 2], "timestamp": [1, 2]}))
    expect(lambda: generic.load(tmp_path), file="interactions.parquet", row=2, column="user_id",
           reason="negative id -2")
    to_parquet(tmp_path, pd.DataFrame({"user_id": [1, 2], "item_id": [1.0, 2.5], "timestamp": [1, 2]}))
    expect(lambda: generic.load(tmp_path), file="interactions.parquet", row=2, column="item_id",
           reason="id 2.5 is not an integer")


def test_generic_parquet_unsupported_type(tmp_path):
    to_parquet(tmp_path, pd.DataFrame({"user_id": [True], "item_id": [1], "timestamp": [1]}))
    expect(lambda: generic.load(tmp_path), file="interactions.parquet", column="user_id",
           reason="unsupported parquet column type bool")


@pytest.mark.parametrize("value", ["2020-01-01", "soon", "-inf"])
def test_generic_timestamp_not_numeric(tmp_path, value):
    expect(lambda: generic.load(gen(tmp_path, G_GOOD + f"3,10,{value},1\n")), file="interactions.csv", row=4,
           column="timestamp", reason="is not a finite number")


def test_generic_rating_not_numeric(tmp_path):
    expect(lambda: generic.load(gen(tmp_path, G_GOOD + "3,10,1,high\n")), file="interactions.csv", row=4,
           column="rating", reason="rating 'high'")


def test_generic_duplicate_rows_csv(tmp_path):
    inter = G_GOOD + "3,11,5,1\n2,10,101,0\n"
    expect(lambda: generic.load(gen(tmp_path, inter)), file="interactions.csv", row=5,
           reason=r"duplicate interaction \(user_id=2, item_id=10, timestamp=101\) of row 3")
    assert len(generic.load(tmp_path, allow_duplicates=True).interactions) == 4


def test_generic_duplicate_rows_parquet(tmp_path):
    to_parquet(tmp_path, pd.DataFrame({"user_id": ["a", "b", "a"], "item_id": [1, 1, 1], "timestamp": [5.0, 5.0, 5.0]}))
    expect(lambda: generic.load(tmp_path), file="interactions.parquet", row=3, reason="of row 1")
    assert len(generic.load(tmp_path, allow_duplicates=True).interactions) == 3


def test_generic_every_row_dropped(tmp_path):
    expect(lambda: generic.load(gen(tmp_path, G_HEADER + ",1,1,1\n1,,1,1\n"), skip_missing=True), file="interactions.csv",
           reason="no usable rows: all 2 rows")


def test_generic_every_row_dropped_parquet(tmp_path):
    to_parquet(tmp_path, pd.DataFrame({"user_id": [None, "a"], "item_id": ["x", ""], "timestamp": [1, 2]}))
    expect(lambda: generic.load(tmp_path, skip_missing=True), file="interactions.parquet", reason="no usable rows")


@pytest.mark.parametrize("cat, row, column, reason", [
    ("item_id,text\n10,a\n11,b\n10,c\n", 4, "item_id", r"duplicate item_id 10 \(also on row 2\)"),
    ("id,text\n10,a\n", 1, "item_id", "missing required column"),
    ("item_id,text\n10,a\n,b\n", 3, "item_id", "empty item_id"),
    ("item_id,text\n", None, None, "no data rows"),
    ('item_id,text\n10,"multi\nline"\n-11,b\n', 4, "item_id", "negative id -11"),
])
def test_generic_bad_catalogue(tmp_path, cat, row, column, reason):
    expect(lambda: generic.load(gen(tmp_path, cat=cat)), file="catalogue.csv", row=row, column=column, reason=reason)


def test_generic_catalogue_binary(tmp_path):
    expect(lambda: generic.load(gen(tmp_path, cat=BINARY)), file="catalogue.csv", reason="binary content")


def test_generic_catalogue_truncated_parquet(tmp_path):
    gen(tmp_path)
    to_parquet(tmp_path, pd.DataFrame({"item_id": range(50), "text": ["t"] * 50}), "catalogue.parquet")
    data = (tmp_path / "catalogue.parquet").read_bytes()
    write(tmp_path / "catalogue.parquet", data[:-20])
    expect(lambda: generic.load(tmp_path), file="catalogue.parquet", reason="not a readable parquet file")


def test_generic_catalogue_duplicate_ids_parquet(tmp_path):
    gen(tmp_path)
    to_parquet(tmp_path, pd.DataFrame({"item_id": ["a", "b", "a"]}), "catalogue.parquet")
    expect(lambda: generic.load(tmp_path), file="catalogue.parquet", row=3, column="item_id",
           reason="duplicate item_id a")


def test_generic_catalogue_text_must_be_text(tmp_path):
    gen(tmp_path)
    to_parquet(tmp_path, pd.DataFrame({"item_id": [10], "text": [1.5]}), "catalogue.parquet")
    expect(lambda: generic.load(tmp_path), file="catalogue.parquet", column="text", reason="expected text")
