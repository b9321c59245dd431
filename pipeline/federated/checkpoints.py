"""Checkpoint integrity: every file of a round's checkpoint folder is listed in its manifest
with its sha256, and a folder whose files do not match is never loaded (a resume falls back to
the newest intact one).

Layout: <run>/checkpoints/round-000007/{global.pt, pool-0.pt, ..., manifest.json}
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def damage(folder: Path) -> str | None:
    """Why checkpoint `folder` cannot be trusted (None: intact). Manifests written before
    digests were recorded are checked for their files' presence only."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError) as error:
        return f"manifest.json unreadable ({error})"
    names = ["global.pt", *(f"pool-{i}.pt" for i in range(int(manifest.get("pools", 0))))]
    digests = manifest.get("sha256", {})
    for name in names:
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if name in digests and sha256_of(path) != digests[name]:
            return f"{name} does not match its sha256 in manifest.json (corrupt or modified)"
    return None


def newest_intact(root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete, intact checkpoint under `root` and the newer ones skipped, with why."""
    skipped = []
    for folder in sorted((p for p in root.glob("round-*") if (p / "manifest.json").is_file()), reverse=True):
        reason = damage(folder)
        if reason is None:
            return folder, skipped
        skipped.append((folder, reason))
    return None, skipped
