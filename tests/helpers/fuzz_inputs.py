"""Hypothesis strategies for hostile input, shared by the tests/test_fuzz_*.py modules.

A text file is a list of rows of fields; `damaged_text` breaks it in one way (a hostile cell,
a duplicated header, a dropped, added or short column, a repeated or blank line, header only)
and may then break its bytes (cut at a random byte, another encoding, random bytes, empty).
"""

from __future__ import annotations

import io
import os

import pyarrow as pa
import pyarrow.parquet as pq

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from PIL import Image

# FUZZ_EXAMPLES=2000 for a deeper local run; CI keeps the default, derandomized
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "80"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

HOSTILE = [
    "", " ", "nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e309", "-1e309", "1e-400", "-1", "-0", "+5", "0",
    "9223372036854775807", "9223372036854775808", "-9223372036854775808", "-9223372036854775809",
    "18446744073709551616", "1" * 40, "0" * 30 + "7", "1.5", "1e3", "1.", ".5", "0x1F", "\u0661\u0662", "1_000",
    "None", "null", "NA", "\\N", '"', '"unclosed', '"a""b"', "a,b", "a|b", "a\tb", "a b", "\t", "\u00e9",
    "\ufeff", "\x00", "\r", "\n", "\x1c", "\u2028", "\u00a0", "x" * 300,
]
CELL = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=8))
ENCODINGS = ["latin-1", "cp1252", "utf-16", "utf-16-le", "utf-32", "utf-8-sig", "shift_jis"]
ROW_DAMAGE = ["none", "cell", "cell", "header", "duplicate_column", "drop_column", "extra_column", "short_row",
              "long_row", "duplicate_row", "blank_lines", "header_only", "only_one_row"]
BYTE_DAMAGE = ["none", "none", "cut", "encoding", "random", "empty"]


@st.composite
def damaged_text(draw, rows: list[list[str]], sep: str, encoding: str = "utf-8") -> bytes:
    """The bytes of `rows` (first row: the header, if the format has one) damaged in one way."""
    rows = [list(r) for r in rows]
    kind = draw(st.sampled_from(ROW_DAMAGE))
    i = draw(st.integers(0, len(rows) - 1))
    j = draw(st.integers(0, len(rows[0]) - 1))
    if kind == "cell":
        rows[i][min(j, len(rows[i]) - 1)] = draw(CELL)
    elif kind == "header":
        rows[0][j] = draw(CELL)
    elif kind == "duplicate_column":
        rows[0][j] = rows[0][draw(st.integers(0, len(rows[0]) - 1))]
        if draw(st.booleans()):
            rows = [r + [r[j]] for r in rows]  # a whole extra column under a repeated name
    elif kind == "drop_column":
        rows = [r[:j] + r[j + 1:] for r in rows]
    elif kind == "extra_column":
        rows = [r + [draw(CELL)] for r in rows]
    elif kind == "short_row":
        rows[i] = rows[i][:-1]
    elif kind == "long_row":
        rows[i] = rows[i] + [draw(CELL)]
    elif kind == "duplicate_row":
        rows.insert(i, list(rows[i]))
    elif kind == "blank_lines":
        rows.insert(i, [draw(st.sampled_from(["", " ", "\t", "  \t "]))])
    elif kind == "header_only":
        rows = rows[:1]
    elif kind == "only_one_row":
        rows = rows[:1] + rows[i:i + 1] if i else rows[:2]
    eol = draw(st.sampled_from(["\n", "\r\n"]))
    text = "".join(sep.join(r) + eol for r in rows)
    data = text.encode(encoding, errors="replace")
    damage = draw(st.sampled_from(BYTE_DAMAGE))
    if damage == "cut":
        data = data[: draw(st.integers(0, len(data)))]
    elif damage == "encoding":
        # a non-ASCII character, so that the encoding shows
        data = text.replace(rows[-1][-1] if rows[-1] else "", "caf\u00e9", 1).encode(
            draw(st.sampled_from(ENCODINGS)), errors="replace")
    elif damage == "random":
        data = draw(st.binary(max_size=300))
    elif damage == "empty":
        data = draw(st.sampled_from([b"", b"\n", b"\r\n", b" ", b"\n\n\n", b"\xef\xbb\xbf"]))
    return data


ARROW_TYPES = {
    "int64": (pa.int64(), st.integers(-(2**63), 2**63 - 1)),
    "uint64": (pa.uint64(), st.integers(0, 2**64 - 1)),
    "int8": (pa.int8(), st.integers(-128, 127)),
    "float64": (pa.float64(), st.floats(allow_nan=True, allow_infinity=True)),
    "float32": (pa.float32(), st.floats(width=32, allow_nan=True, allow_infinity=True)),
    "string": (pa.string(), CELL),
    "large_string": (pa.large_string(), CELL),
    "dictionary": (pa.dictionary(pa.int32(), pa.string()), CELL),
    "binary": (pa.binary(), st.binary(max_size=6)),
    "bool": (pa.bool_(), st.booleans()),
    "timestamp": (pa.timestamp("s"), st.integers(-(2**40), 2**40)),
    "date": (pa.date32(), st.integers(-(2**20), 2**20)),
    "list": (pa.list_(pa.int64()), st.lists(st.integers(0, 9), max_size=2)),
    "decimal": (pa.decimal128(20, 2), st.decimals(-(10**17), 10**17, places=2, allow_nan=False)),
    "null": (pa.null(), st.none()),
}


@st.composite
def arrow_column(draw, n: int) -> pa.Array:
    """A column of n values of a random arrow type, some of them null."""
    kind = draw(st.sampled_from(sorted(ARROW_TYPES)))
    typ, values = ARROW_TYPES[kind]
    cells = draw(st.lists(st.one_of(st.none(), values) if kind != "null" else values, min_size=n, max_size=n))
    if kind == "dictionary":
        return pa.array(cells, pa.string()).dictionary_encode()
    if kind == "timestamp":
        return pa.array(cells, pa.int64()).cast(typ)
    if kind == "date":
        return pa.array(cells, pa.int32()).cast(typ)
    return pa.array(cells, typ)


@st.composite
def parquet_file(draw, columns: list[str]) -> bytes:
    """A parquet file: the named columns (some renamed, repeated or dropped) of random types,
    possibly cut at a random byte."""
    n = draw(st.integers(0, 5))
    names = [draw(st.sampled_from([c, c, c, columns[0], "other"])) for c in columns]
    table = pa.Table.from_arrays([draw(arrow_column(n)) for _ in names], names=names)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    data = sink.getvalue()
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return data


def png_bytes(size=(12, 9), colour=(200, 30, 60), fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


PNG, JPEG, GIF = png_bytes(), png_bytes(fmt="JPEG"), png_bytes(fmt="GIF")


@st.composite
def image_file(draw) -> tuple[bytes, bool | None]:
    """(bytes a file named like an image may hold, whether they decode: True, False, or None
    for either). Mostly no image: zero bytes, random bytes, text, a truncated PNG/JPEG/GIF."""
    kind = draw(st.sampled_from(["good", "zero", "random", "text", "cut", "cut", "header_only", "flipped"]))
    good = draw(st.sampled_from([PNG, JPEG, GIF]))
    if kind == "good":
        return good, True
    if kind == "zero":
        return b"", False
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=400)), False
    if kind == "text":
        return draw(st.text(min_size=1, max_size=40)).encode(), False
    if kind == "cut":  # a truncated image: the header survives, the pixels do not
        return good[: draw(st.integers(1, len(good) // 2))], False
    if kind == "header_only":
        return good[:8], False
    k = draw(st.integers(0, len(good) - 1))  # one corrupted byte: may or may not still decode
    return good[:k] + bytes([good[k] ^ 0xFF]) + good[k + 1:], None
