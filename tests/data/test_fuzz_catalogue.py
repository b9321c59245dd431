"""Hostile input for the encode stage's catalogue reader and image decoder.

read_catalogue on a damaged .csv/.tsv/.jsonl/.parquet either returns a valid ItemTable
(`check_table`) that the stage can hash and decode, or raises DataError naming the file.
write_catalogue round-trips any loader Catalogue (any text, any ids) or refuses it with
DataError before writing anything. Images that are not images get a status, never an error.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz_inputs import FUZZ, HOSTILE, PNG, damaged_text, image_file, parquet_file
from pipeline.data.schema import Catalogue, DataError
from pipeline.encode.catalogue import ItemTable, content_hash, from_catalogue, read_catalogue, write_catalogue
from pipeline.encode.images import CORRUPT, MISSING, OK, decode_images

ROWS = [["item_id", "text", "image_path"], ["30", "thirty", "img/a.png"], ["10", '"ten, with a comma"', ""],
        ["20", "", "img/b.png"]]


def folder_with_images(root: Path) -> Path:
    (root / "img").mkdir()
    (root / "img" / "a.png").write_bytes(PNG)
    (root / "img" / "b.png").write_bytes(PNG)
    return root


def read_or_data_error(path: Path) -> ItemTable | None:
    """The table read from `path` (checked, hashed and decoded), or None after a DataError naming it."""
    try:
        table = read_catalogue(path)
    except DataError as error:
        assert error.file == str(path), str(error)
        assert str(error).startswith(error.file) and error.reason, str(error)
        assert error.row is None or error.row >= 1, str(error)
        return None
    check_table(table)
    return table


def check_table(table: ItemTable) -> None:
    """What the stage relies on: ids typed, unique and ascending; texts and paths str."""
    n = len(table)
    assert n > 0 and len(table.text) == len(table.image) == n
    ids = table.item_id
    assert ids.dtype == np.int64 or ids.dtype.kind == "U"
    assert all(v != "" for v in ids.tolist())
    assert (ids[1:] > ids[:-1]).all()  # unique and sorted
    assert all(isinstance(t, str) and t == t.strip() for t in table.text)
    assert all(isinstance(p, str) and (p == "" or Path(p).is_absolute()) for p in table.image)
    assert len(content_hash(table)) == 64
    _, status = decode_images(list(table.image), 8)
    assert set(status) <= {OK, CORRUPT, MISSING}


@pytest.mark.parametrize("suffix, sep", [(".csv", ","), (".tsv", "\t")])
@FUZZ
@given(data=st.data())
def test_damaged_text_catalogue(suffix, sep, data):
    rows = [[c.replace(",", ";") if sep == "\t" else c for c in r] for r in ROWS]
    damaged = data.draw(damaged_text(rows, sep), label="bytes")
    with tempfile.TemporaryDirectory() as d:
        path = folder_with_images(Path(d)) / f"catalogue{suffix}"
        path.write_bytes(damaged)
        read_or_data_error(path)


JSON_VALUES = st.one_of(
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", str(2**63), str(2**64), str(-(2**63) - 1), "-1",
                     "1.5", "1.0", "true", "null", "[]", "{}", '{"a": 1}', "[1, 2]", '""', '" "', '"\\u0000"',
                     '"img/a.png"', '"../../etc/passwd"', '"' + "x" * 300 + '"']),
    st.sampled_from(HOSTILE).map(json.dumps),
    st.integers().map(str),
    st.text(max_size=8).map(json.dumps),
)


@st.composite
def damaged_jsonl(draw) -> bytes:
    """JSON lines whose values are hostile, with keys missing, repeated or extra, lines that are
    not objects, or then the bytes damaged like any text file."""
    records = [[("item_id", "30"), ("text", '"thirty"'), ("image_path", '"img/a.png"')],
               [("item_id", "10"), ("text", '"ten"'), ("image_path", '""')],
               [("item_id", "20"), ("text", "null"), ("image_path", '"img/b.png"')]]
    for _ in range(draw(st.integers(1, 3))):
        r = draw(st.integers(0, len(records) - 1))
        kind = draw(st.sampled_from(["value", "value", "drop_key", "repeat_key", "extra_key", "not_object"]))
        if isinstance(records[r], str) or not records[r]:
            continue
        k = draw(st.integers(0, len(records[r]) - 1))
        if kind == "value":
            records[r][k] = (records[r][k][0], draw(JSON_VALUES))
        elif kind == "drop_key":
            del records[r][k]
        elif kind == "repeat_key":
            records[r].append((records[r][k][0], draw(JSON_VALUES)))
        elif kind == "extra_key":
            records[r].append((draw(st.sampled_from(["x", "", "item_id "])), draw(JSON_VALUES)))
        else:
            records[r] = draw(st.sampled_from(["[1, 2]", "1", "null", '"s"', "{", ""]))
    lines = [r if isinstance(r, str) else "{" + ", ".join(f'"{k}": {v}' for k, v in r) + "}" for r in records]
    return data_from_lines(draw, lines)


def data_from_lines(draw, lines: list[str]) -> bytes:
    rows = [[line] for line in lines]
    return draw(damaged_text(rows, "\x1f")) if draw(st.booleans()) else "\n".join(lines).encode()


@FUZZ
@given(data=st.data())
def test_damaged_jsonl_catalogue(data):
    damaged = data.draw(damaged_jsonl(), label="bytes")
    with tempfile.TemporaryDirectory() as d:
        path = folder_with_images(Path(d)) / "catalogue.jsonl"
        path.write_bytes(damaged)
        read_or_data_error(path)


@FUZZ
@given(data=st.data())
def test_parquet_catalogue_of_any_column_types(data):
    damaged = data.draw(parquet_file(["item_id", "text", "image_path"]), label="parquet")
    with tempfile.TemporaryDirectory() as d:
        path = folder_with_images(Path(d)) / "catalogue.parquet"
        path.write_bytes(damaged)
        read_or_data_error(path)


HUGE = ["9223372036854775807", "9223372036854775808", "-9223372036854775809", str(2**64), str(10**40), "-1",
        "+7", "007", "\u0661\u0662"]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
@FUZZ
@given(value=st.sampled_from(HUGE), quoted=st.booleans())
def test_huge_and_odd_integer_ids(suffix, value, quoted):
    """Integer ids load as int64 with their exact value; beyond int64 the ids stay strings (as
    the generic loader reads them), never wrapped around or rounded."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"catalogue{suffix}"
        if suffix == ".csv":
            path.write_text(f"item_id,text,image_path\n1,one,\n{value},two,\n")
        else:
            shown = json.dumps(value) if quoted or not value.lstrip("+-").isascii() else value.lstrip("+")
            path.write_text(f'{{"item_id": 1, "text": "one", "image_path": ""}}\n'
                            f'{{"item_id": {shown}, "text": "two", "image_path": ""}}\n')
        table = read_or_data_error(path)
    if table is None:  # only JSON refuses: a bare 007 is not JSON
        assert suffix == ".jsonl" and value == "007" and not quoted
    elif table.item_id.dtype == np.int64:
        assert int(value) in table.item_id.tolist() and value.lstrip("+-").isascii()
    else:
        assert value in table.item_id.tolist()
        assert not value.isascii() or not -(2**63) <= int(value) < 2**63


# ----------------------------------------------------------------------------- write_catalogue

IDS = st.one_of(
    st.lists(st.integers(0, 2**63 - 1), min_size=1, max_size=6),
    st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=6),
)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet", ".jsonl"])
@FUZZ
@given(ids=IDS, texts=st.lists(st.one_of(st.text(max_size=12), st.sampled_from(HOSTILE)), min_size=6, max_size=6))
def test_write_catalogue_round_trips_or_refuses(suffix, ids, texts):
    """What write_catalogue writes, read_catalogue reads back as the same table; a catalogue
    the stage cannot use is refused with DataError before anything is written."""
    catalogue = Catalogue(np.array(ids, dtype=object), np.array(texts[: len(ids)], dtype=object),
                          np.array([""] * len(ids), dtype=object))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"out{suffix}"
        try:
            want = from_catalogue(catalogue)
        except DataError:
            with pytest.raises(DataError):
                write_catalogue(catalogue, path)
            assert list(Path(d).iterdir()) == []
            return
        got = read_catalogue(write_catalogue(catalogue, path))
        assert [p.name for p in Path(d).iterdir()] == [path.name]
    assert got.item_id.dtype == want.item_id.dtype
    assert got.item_id.tolist() == want.item_id.tolist()
    assert got.text.tolist() == want.text.tolist()


# ----------------------------------------------------------------------------- images


@FUZZ
@given(files=st.lists(image_file(), min_size=1, max_size=4), odd=st.sampled_from(["", "folder", "nul", "long"]))
def test_catalogue_images_that_are_not_images(files, odd):
    """Every referenced file gets a status from the decoder (never an exception), the content
    hash covers it, and a path no file system accepts is refused when the catalogue is read."""
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        paths = []
        for k, (content, _) in enumerate(files):
            (root / f"{k}.png").write_bytes(content)
            paths.append(f"{k}.png")
        if odd == "folder":
            (root / "dir.png").mkdir()
        extra = {"": [], "folder": ["dir.png"], "nul": ["a\x00b.png"], "long": ["x" * 300 + ".png"]}[odd]
        lines = [json.dumps({"item_id": k, "text": "t", "image_path": p}) for k, p in enumerate(paths + extra)]
        (root / "catalogue.jsonl").write_text("\n".join(lines) + "\n")
        table = read_or_data_error(root / "catalogue.jsonl")
        if odd == "nul":
            assert table is None
            return
        assert table is not None
        _, status = decode_images(list(table.image), 8)
    for (_, decodes), state in zip(files, status):
        if decodes is not None:
            assert state == (OK if decodes else CORRUPT)
    if extra:
        assert status[-1] == MISSING


# ----------------------------------------------------------------------------- what the fuzzing found

FOUND = [  # (file name, content, row, reason)
    ("c.csv", "item_id,text,image_path\n1,a,\n9223372036854775808,b,\n", None, None),  # ids stay str
    ("c.csv", "item_id,text,image_path,text\n1,a,,b\n", 1, r"duplicate column name\(s\) text"),
    ("c.jsonl", '{"item_id": 1, "text": "a", "image_path": "a\\u0000b"}\n', 1, "contains a NUL character"),
    ("c.jsonl", '{"item_id": 1, "text": "a", "image_path": ""}\n\n[1, 2]\n', 3, "found a JSON list; expected one"),
    ("c.jsonl", '{"item_id": 1, "text": "a", "image_path": ""}\n{"item_id": 2,\n', 2, "not valid JSON"),
    ("c.jsonl", '{"item_id": 1.5, "text": "a", "image_path": ""}\n', 1, "item_id 1.5 is not an integer"),
    ("c.jsonl", '{"item_id": 1, "text": {"a": 1}, "image_path": ""}\n', 1, "text holds a dict value"),
    ("c.jsonl", '{"item_id": 1, "text": "a", "image_path": ""}\n{"item_id": -9223372036854775809}\n', None, None),
]


@pytest.mark.parametrize("name, content, row, reason", FOUND)
def test_found_by_fuzzing(name, content, row, reason):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_text(content)
        if reason is None:  # an id beyond int64 makes every id a string, as in the generic loader
            table = read_or_data_error(path)
            assert table.item_id.dtype.kind == "U" and len(table) == 2
            return
        with pytest.raises(DataError, match=reason) as error:
            read_catalogue(path)
    assert error.value.row == row and error.value.file == str(path)


def test_found_by_fuzzing_parquet_and_writers():
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.parquet"
        pd.DataFrame({"item_id": pd.Series([], dtype=object), "text": pd.Series([], dtype=object),
                      "image_path": pd.Series([], dtype=bool)}).to_parquet(path)  # was AttributeError (.str)
        with pytest.raises(DataError, match="no rows"):
            read_catalogue(path)
        path = Path(d) / "indexed.parquet"  # a stored pandas index: was TypeError numbering rows
        pd.DataFrame({"item_id": [1, 1], "text": ["a", "b"], "image_path": ["", ""]},
                     index=["x", "y"]).to_parquet(path)
        with pytest.raises(DataError, match="duplicate item_id") as error:
            read_catalogue(path)
        assert error.value.row == 2
        path = Path(d) / "float_ids.jsonl"  # integral floats are integer ids
        path.write_text('{"item_id": 2.0, "text": "a", "image_path": ""}\n{"item_id": 1, "text": "b"}\n')
        assert read_catalogue(path).item_id.tolist() == [1, 2]
        # a numpy str array dropped trailing NULs; pandas' CSV writer left a lone \r unquoted
        texts = ["trailing NUL\x00", "carriage\rreturn", "a\r"]
        for ids in ([1, 2, 3], ["a\rb", "c", "d"]):
            catalogue = Catalogue(np.array(ids), np.array(texts, dtype=object), np.array([""] * 3, dtype=object))
            for suffix in (".csv", ".tsv", ".parquet", ".jsonl"):
                got = read_catalogue(write_catalogue(catalogue, Path(d) / f"w{suffix}"))
                assert got.text.tolist() == [t.strip() for t in texts] and got.item_id.tolist() == ids
    _, status = decode_images(["/" + "x" * 300 + ".png"], 8)  # too long for the file system: was OSError
    assert status.tolist() == [MISSING]

