"""Run records: the part of a finished run that a results table and its plot are made of,
kept small enough to commit beside the table.

A run directory (checkpoints, TensorBoard logs, the full metrics.jsonl) stays out of git and is
gone on a fresh clone or another machine. Its record, <records_dir>/<key>/seed-<s>.json, holds
the run's summary.json and the per-round rows of metrics.jsonl restricted to RECORDED_KEYS and
RECORDED_PREFIXES (about 1.2 KB per round: 11-36 KB for the MovieLens runs of 7-30 rounds). The experiments
command writes one for every finished run it sees and, for a planned run not finished on disk,
reads the record instead of training (or resuming) it: a table can be completed across sessions
and machines, one seed here, another there, and rebuilt from the records alone.

A record is checked like a summary.json on disk: made by the same config (runtime settings aside)
on the same preparation of the data and the same item features (fingerprints; records from before
the features fingerprint are checked on the split), else it is refused (StaleRunError).
"""

from __future__ import annotations

import json
from pathlib import Path

FORMAT = "pipeline-run-record/1"
# metric rows kept per round: what the tables, the validation and loss plot and the cost plot read
RECORDED_PREFIXES = ("valid/", "test/", "time/", "comm/",
                     *(f"{p}/{split}/" for p in ("p1", "p3") for split in ("valid", "test")))  # train.also_protocols
RECORDED_KEYS = ("round", "train/loss")


class RecordError(ValueError):
    """A file in the records folder that is not the record of the run it stands for."""


def record_path(records_dir: Path, key: str, seed: int) -> Path:
    return Path(records_dir) / key / f"seed-{seed}.json"


def compact_rows(rows: list[dict]) -> list[dict]:
    """Each metrics row reduced to the RECORDED_KEYS and the RECORDED_PREFIXES keys."""
    return [{key: value for key, value in row.items() if key in RECORDED_KEYS or key.startswith(RECORDED_PREFIXES)}
            for row in rows]


def make_record(key: str, seed: int, summary: dict, rows: list[dict]) -> dict:
    return {"format": FORMAT, "key": key, "seed": int(seed), "summary": summary, "metrics": compact_rows(rows)}


def record_text(record: dict) -> str:
    """Stable text (sorted keys, fixed indent): rewriting an unchanged record changes no byte."""
    return json.dumps(record, indent=1, sort_keys=True, default=str) + "\n"


def write_record(records_dir: Path, record: dict) -> None:
    """Write the record atomically, unless the file already holds exactly this text."""
    from pipeline.data.store import write_text_atomically

    path = record_path(records_dir, record["key"], record["seed"])
    text = record_text(record)
    if not (path.is_file() and path.read_text() == text):
        write_text_atomically(path, text)


def read_record(records_dir: Path, key: str, seed: int) -> dict | None:
    """The record of (key, seed), or None when there is none; RecordError (file and reason) when
    the file is not a record of that run."""
    path = record_path(records_dir, key, seed)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise RecordError(f"{path}: not a run record (invalid JSON at line {error.lineno}: {error.msg})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise RecordError(f"{path}: not a run record (format {found!r}, expected {FORMAT!r})")
    if record.get("key") != key or record.get("seed") != seed:
        raise RecordError(f"{path}: holds the record of {record.get('key')!r} seed {record.get('seed')!r}, "
                         f"not of {key!r} seed {seed}")
    summary = record.get("summary")
    if not isinstance(summary, dict) or not isinstance(summary.get("selection"), dict) \
            or not isinstance(record.get("metrics"), list):
        raise RecordError(f"{path}: not a run record (no summary with a selection, or no metrics rows)")
    return record


def read_metrics(run_dir) -> list[dict]:
    """The rows of a run's metrics.jsonl (a torn last line is ignored)."""
    rows = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
