"""Checkpoint integrity (pipeline/federated/runtime/checkpoints.py): a damaged checkpoint is never
loaded; a resume falls back to the newest intact one. The fault report (bench/faults.py) runs
the scenarios on a 3-node local Ray cluster and must lose no run and no client state."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.federated.runtime.checkpoints import damage, newest_intact, sha256_of

REPO = Path(__file__).resolve().parents[2]


def write_checkpoint(root: Path, round_: int, pools: int = 2, digests: bool = True) -> Path:
    folder = root / f"round-{round_:06d}"
    folder.mkdir(parents=True)
    names = ["global.pt", *(f"pool-{i}.pt" for i in range(pools))]
    for name in names:
        (folder / name).write_bytes(f"{name} of round {round_}".encode() * 100)
    manifest = {"round": round_, "pools": pools}
    if digests:
        manifest["sha256"] = {name: sha256_of(folder / name) for name in names}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_the_newest_intact_checkpoint_is_chosen(tmp_path):
    older, newer = write_checkpoint(tmp_path, 3), write_checkpoint(tmp_path, 4)
    assert newest_intact(tmp_path) == (newer, [])
    with open(newer / "pool-1.pt", "r+b") as handle:  # one flipped byte
        handle.seek(10)
        byte = handle.read(1)
        handle.seek(10)
        handle.write(bytes([byte[0] ^ 0xFF]))
    folder, skipped = newest_intact(tmp_path)
    assert folder == older
    assert skipped == [(newer, "pool-1.pt does not match its sha256 in manifest.json (corrupt or modified)")]


def test_missing_files_and_unreadable_manifests_are_damage(tmp_path):
    folder = write_checkpoint(tmp_path, 1, pools=3)
    (folder / "pool-2.pt").unlink()
    assert damage(folder) == "pool-2.pt is missing"
    (folder / "manifest.json").write_text("{not json")
    assert damage(folder).startswith("manifest.json unreadable")
    assert newest_intact(tmp_path) == (None, [(folder, damage(folder))])


def test_manifests_without_digests_are_checked_for_presence(tmp_path):
    folder = write_checkpoint(tmp_path, 2, digests=False)
    (folder / "global.pt").write_bytes(b"changed")
    assert damage(folder) is None  # written before digests existed: nothing to compare with


@pytest.mark.slow
def test_fault_report_loses_no_run_and_no_client_state():
    done = subprocess.run([sys.executable, "-m", "bench.faults", "--quick", "--scenarios", "node removed",
                           "corrupt checkpoint", "dropout 30%"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["runs_lost"] == 0 and figures["client_state_lost"] == 0, figures
    for name, row in figures["scenarios"].items():
        assert row["completed"] == row["trials"] == row["metrics_equal"] == 1, (name, row)
    assert "| node removed | 1 | 1 | 0 | 1/1 |" in done.stdout
