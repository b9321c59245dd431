"""What a command may write to its --out: nothing it did not make.

A command that writes a folder (export, encode, data synth) replaces its --out as a whole. Before
it does, check_output refuses
  - an --out that is, contains or lies inside one of the command's inputs (even with --overwrite),
  - a training run directory (even with --overwrite),
  - anything else that exists and is not an earlier output of the same command (recognised by the
    file that command always writes: its manifest, model card or config), or that holds files the
    command does not write,
  - an earlier output of the same command unless the user asked to replace it (--overwrite).
An empty folder is no loss and is accepted.

A command that writes one Markdown report file (baselines, experiments) replaces it as a whole:
check_report_file refuses an --out that is one of the command's inputs, a folder, or an existing
file whose first line is not the command's own `<!-- made by: python -m pipeline <command> ... -->`.
An earlier report of the same command is replaced (re-running a command refreshes its report).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable


class OutputError(ValueError):
    """An --out that the command refuses to write; the message says why in one line."""


@dataclass(frozen=True)
class OutputKind:
    """command: as typed after `python -m pipeline`; what: what it writes ("an export");
    marker: the file by which an earlier output is recognised; names: every entry it writes;
    recognise(folder) -> True when the folder's marker is the command's own."""

    command: str
    what: str
    marker: str
    names: frozenset[str]
    recognise: Callable[[Path], bool]


def is_run_directory(path: Path) -> bool:
    """A folder a train or centralized job wrote (config.yaml beside its metrics or checkpoints)."""
    path = Path(path)
    return path.is_dir() and (path / "config.yaml").is_file() and any(
        (path / name).exists() for name in ("metrics.jsonl", "checkpoints", "summary.json", "ray_train", ".lock"))


def _relation(out: Path, source: Path) -> str | None:
    if out == source:
        return "is"
    if source.is_relative_to(out):
        return "contains"
    if out.is_relative_to(source):
        return "is inside"
    return None


def _check_inputs(shown: Path, out: Path, what: str, inputs: Iterable) -> None:
    for source in inputs:
        if source is None:
            continue
        resolved = Path(source).expanduser().resolve()
        if (relation := _relation(out, resolved)) is not None:
            raise OutputError(f"refusing to write {what} to {shown}: it {relation} the command's input "
                              f"{source}; choose an --out outside its inputs")


def check_output(out, kind: OutputKind, *, inputs: Iterable = (), overwrite: bool = False) -> None:
    """Raise OutputError unless `kind.command` may write `out` (see the module's docstring)."""
    shown = Path(out)
    out = shown.expanduser().resolve()
    _check_inputs(shown, out, kind.what, inputs)
    if not out.exists() and not out.is_symlink():
        return
    if is_run_directory(out):
        raise OutputError(f"refusing to write {kind.what} to {shown}: it is a training run directory; "
                          f"choose another --out")
    if out.is_symlink() or not out.is_dir():
        raise OutputError(f"refusing to replace {shown}: it exists and is not a folder `pipeline {kind.command}` "
                          f"wrote; choose another --out")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if not kind.recognise(out):
        raise OutputError(f"refusing to replace {shown}: it exists and is not {kind.what} written by "
                          f"`pipeline {kind.command}` (no {kind.marker} of its own); choose another --out")
    extra = [name for name in entries if name not in kind.names]
    if extra:
        listed = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise OutputError(f"refusing to replace {shown}: besides {kind.what} it holds {listed}, which "
                          f"`pipeline {kind.command}` did not write; move them away or choose another --out")
    if not overwrite:
        raise OutputError(f"{shown} already holds {kind.what} from an earlier `pipeline {kind.command}`; "
                          f"pass --overwrite to replace it")


MADE_BY = "<!-- made by: "


def made_by(path, *programs: str) -> bool:
    """Whether the file's first line is a `<!-- made by: PROGRAM ...` header of one of `programs`
    (e.g. "python -m pipeline baselines")."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            first = handle.readline(4096)
    except OSError:
        return False
    return any(first.startswith(f"{MADE_BY}{program} ") or first.startswith(f"{MADE_BY}{program} -->")
               for program in programs)


def check_report_file(out, command: str, *, programs: Iterable[str] = (), inputs: Iterable = ()) -> None:
    """Raise OutputError unless `pipeline <command>` may write its Markdown report to the file `out`
    (see the module's docstring); `programs`: other invocations of the same command whose header
    it accepts as its own (e.g. "python -m pipeline.report.cli")."""
    shown = Path(out)
    out = shown.expanduser().resolve()
    _check_inputs(shown, out, "a report", inputs)
    if not out.exists() and not out.is_symlink():
        return
    if out.is_dir():
        raise OutputError(f"refusing to write a report to {shown}: it is a folder; --out names the Markdown file")
    if out.is_symlink() or not made_by(out, f"python -m pipeline {command}", *programs):
        raise OutputError(f"refusing to replace {shown}: it exists and is not a report written by "
                          f"`pipeline {command}` (its first line is not `{MADE_BY}python -m pipeline {command} "
                          f"... -->`); choose another --out")


def sha256_of(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks (manifests of checkpoints and feature stores)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
