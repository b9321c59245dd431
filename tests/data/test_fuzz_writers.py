"""No partially written outputs: every writer, failing at any one of its file writes or
renames, leaves its output as it was (absent, or the previous version byte for byte) and
no temporary file or folder behind.

The disk failure is simulated by making the k-th low-level write (np.save, DataFrame.to_csv,
pq.write_table, Image.save, Path.write_text, os.replace, ...) leave a partial file and raise
ENOSPC, for every k up to the number of writes of a successful run.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.data import synthetic
from pipeline.data.negatives import sample_eval_negatives
from pipeline.data.prepare import PrepareConfig, prepare
from pipeline.data.store import load_prepared, save_prepared, write_atomically, write_text_atomically
from pipeline.encode.catalogue import read_catalogue, write_catalogue
from pipeline.encode.store import load_features, write_store

# (owner, attribute, position of the destination path among the call's arguments or None)
LOW_LEVEL_WRITES = [(np, "save", 0), (np, "savez", 0), (pd.DataFrame, "to_csv", 1), (pd.DataFrame, "to_parquet", 1),
                    (pd.DataFrame, "to_json", 1), (pq, "write_table", 1), (Image.Image, "save", 1),
                    (Path, "write_text", 0), (Path, "write_bytes", 0), (os, "replace", None)]


class DiskFull:
    """Counts low-level writes; the `fail_at`-th one writes a partial file and raises ENOSPC."""

    def __init__(self, monkeypatch, fail_at: int | None = None):
        self.calls, self.fail_at = 0, fail_at
        for owner, name, where in LOW_LEVEL_WRITES:
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name), where))

    def _wrap(self, real, where):
        def write(*args, **kwargs):
            self.calls += 1
            if self.calls == self.fail_at:
                target = args[where] if where is not None and len(args) > where else None
                if isinstance(target, (str, Path)):
                    with open(target, "wb") as handle:
                        handle.write(b"half a file")
                raise OSError(errno.ENOSPC, "No space left on device (simulated)")
            return real(*args, **kwargs)

        return write


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` (hidden ones included) -> its bytes (None for folders)."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def tiny_synthetic(seed: int = 0) -> synthetic.SyntheticData:
    config = synthetic.SyntheticConfig(n_users=12, n_items=10, mean_interactions=5, image_size=16, seed=seed)
    return synthetic.generate(config, progress=False)


def prepared(seed: int = 0):
    data = prepare(tiny_synthetic(seed).dataset, PrepareConfig(min_user=0, min_item=0))
    return data, sample_eval_negatives(data, 0)


def write_synthetic(out: Path, version: int) -> None:
    synthetic.write(tiny_synthetic(version), out, progress=False)


def write_prepared(out: Path, version: int) -> None:
    data, negatives = prepared(version)
    save_prepared(data, negatives, out)


def write_feature_store(out: Path, version: int) -> None:
    ids = np.array([3, 5, 9]) + version
    write_store(out, ids, {"text": np.eye(3, 4, dtype=np.float32), "image": np.eye(3, 2, dtype=np.float32)},
                {"modalities": {"text": {"dim": 4}, "image": {"dim": 2}}})


def write_a_catalogue(out: Path, version: int) -> None:
    write_catalogue(tiny_synthetic(version).dataset.catalogue, out)


WRITERS = {
    "synthetic.write": (write_synthetic, "synth", lambda out: synthetic.load_config(out)),
    "save_prepared": (write_prepared, "prepared", load_prepared),
    "encode.store.write_store": (write_feature_store, "store", load_features),
    "write_catalogue.csv": (write_a_catalogue, "catalogue.csv", read_catalogue),
    "write_catalogue.parquet": (write_a_catalogue, "catalogue.parquet", read_catalogue),
    "write_catalogue.jsonl": (write_a_catalogue, "catalogue.jsonl", read_catalogue),
}


@pytest.mark.parametrize("writer", list(WRITERS))
@pytest.mark.parametrize("existing", [False, True], ids=["new", "replacing"])
def test_a_writer_failing_midway_leaves_no_partial_output(writer, existing, tmp_path, monkeypatch):
    write, name, read = WRITERS[writer]
    out = tmp_path / "parent" / name
    out.parent.mkdir()
    if existing:
        write(out, version=1)
    probe = tmp_path / "probe" / name  # the same run on a working disk counts the writes
    if existing:
        write(probe, version=1)
    with monkeypatch.context() as patch:
        counter = DiskFull(patch)
        write(probe, version=2)
        writes = counter.calls
    assert writes >= 2
    before = snapshot(out.parent)
    for k in range(1, writes + 1):
        with monkeypatch.context() as patch:
            DiskFull(patch, fail_at=k)
            with pytest.raises(OSError, match="simulated"):
                write(out, version=2)
        assert snapshot(out.parent) == before, f"failure at write {k} of {writes} left a trace"
    write(out, version=2)  # and with a working disk, the new version replaces the old
    read(out)
    assert snapshot(out.parent) != before and [p.name for p in out.parent.iterdir()] == [name]


def test_bad_input_found_late_leaves_no_prepared_dataset(tmp_path, capsys):
    """The CLI refuses a dataset whose last row is bad: exit 2, the error names file and row,
    and the output folder is never created."""
    (tmp_path / "data").mkdir()
    rows = "".join(f"{u},{i},{u * 10 + i}\n" for u in range(20) for i in range(5))
    (tmp_path / "data" / "interactions.csv").write_text("user_id,item_id,timestamp\n" + rows + "7,1,nan\n")
    code = main(["data", "prepare", "--format", "generic", str(tmp_path / "data"), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "interactions.csv, row 102, column 'timestamp'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_atomic_outputs_get_the_usual_permissions(tmp_path):
    """Staging folders come from mkdtemp (private); the output is as mkdir would make it."""
    mask = os.umask(0)
    os.umask(mask)
    out = write_atomically(tmp_path / "out", lambda staging: (staging / "a.txt").write_text("x"))
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask


def test_a_report_failing_on_rename_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    report = write_text_atomically(tmp_path / "report.md", "old\n")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError):
        write_text_atomically(report, "new\n")
    assert report.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]
