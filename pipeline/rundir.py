"""A run directory's guards: one writer at a time, and a resume that continues the same run.

RunLock: `<run>/.lock` names the job writing the run (host, PID, start time). The file is held
with an exclusive fcntl.flock for the job's life, so the kernel frees it when the process dies
however it dies; a lock file left behind is found free, reported and taken over. A second writer
fails at once with the holder's name. The file is removed when the job ends, normally or not.

check_resume: a resume continues the stored checkpoint, so the config it runs under must be the
one the run was started with, up to the keys that only say how long or how visibly it runs.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

import yaml

LOCK = ".lock"

# keys a resumed run may change: how long it runs, what it shows and evaluates besides its protocol (an
# also_protocols report then says it is not complete), how often it checkpoints, where
RESUMABLE_KEYS = ("train.rounds", "train.patience", "centralized.epochs", "centralized.patience",
                  "train.also_protocols", "runtime.progress", "runtime.tensorboard", "runtime.checkpoint_every",
                  "runtime.out")


class RunLockedError(ValueError):
    """Another job writes the run directory."""


class ResumeConfigError(ValueError):
    """--resume with a config that differs from the run's in a key that changes what it computes."""


def _holder_text(holder: dict | None) -> str:
    if not holder:
        return "an unknown job (the lock file names none)"
    since = holder.get("since")
    return (f"pid {holder.get('pid')} on host {holder.get('host')}"
            + (f" since {since}" if since else "") + (f" ({holder['command']})" if holder.get("command") else ""))


def _read_holder(fd: int) -> dict | None:
    try:
        raw = os.pread(fd, 1 << 16, 0).decode(errors="replace")
        holder = json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


class RunLock:
    """Exclusive lock of a run directory; a context manager (acquire on enter, release on exit)."""

    def __init__(self, run_dir, command: str | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self.command = command if command is not None else " ".join(["python -m pipeline", *sys.argv[1:]])[:200]
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunLockedError(
                    f"{self.run_dir} is being written by another job: {_holder_text(holder)}; two jobs in one run "
                    f"directory would mix their metrics and checkpoints. Wait for it to end or choose another "
                    f"--out (runtime.out)") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder removed the file between our open and our lock: try again
                os.close(fd)
                continue
            left = _read_holder(fd)
            if left is not None or os.fstat(fd).st_size:
                alive = _alive(left.get("pid")) if left and left.get("host") == socket.gethostname() else None
                state = ("which no longer runs" if alive is False
                         else "which no longer holds it" if alive else "which no longer holds it (another host)")
                print(f"note: {self.path} was left by {_holder_text(left)}, {state}: a stale lock; taking the run "
                      f"directory over", file=sys.stderr, flush=True)
            holder = {"host": socket.gethostname(), "pid": os.getpid(),
                      "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": self.command}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
            os.fsync(fd)
            self.fd = fd
            return self
        raise RunLockedError(f"{self.run_dir}: could not take its lock (the lock file keeps changing)")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still held: nobody takes a file about to vanish
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _alive(pid) -> bool | None:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (TypeError, ValueError, OverflowError):
        return None
    return True


# -------------------------------------------------------------------------------- resume


def _differences(old, new, prefix: str = "") -> list[tuple[str, object, object]]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in [*old, *(k for k in new if k not in old)]:
            found += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return found
    return [] if old == new else [(prefix[:-1], old, new)]


def stored_config(run_dir) -> dict | None:
    """The config a run directory was started with (its config.yaml), every default filled in;
    None when there is none."""
    from pipeline.config import ExperimentConfig

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    raw = yaml.safe_load(path.read_text()) or {}
    try:  # through the same validation as the new config, so defaults and presets read alike
        return json.loads(ExperimentConfig.model_validate(raw).model_dump_json())
    except ValueError:
        return raw


def check_resume(run_dir, config) -> None:
    """Raise ResumeConfigError listing every key (stored and new value) in which `config` differs
    from the run's stored config, besides RESUMABLE_KEYS. Nothing is read but config.yaml."""
    old = stored_config(run_dir)
    if old is None:
        return
    new = json.loads(config.model_dump_json())
    changed = [(key, a, b) for key, a, b in _differences(old, new)
               if not any(key == allowed or key.startswith(allowed + ".") for allowed in RESUMABLE_KEYS)]
    if changed:
        listed = "; ".join(f"{key}: {json.dumps(a, default=str)} in the run, {json.dumps(b, default=str)} now"
                           for key, a, b in changed)
        raise ResumeConfigError(
            f"cannot resume {run_dir} with another config ({listed}). A resume continues the stored checkpoint; "
            f"only {', '.join(RESUMABLE_KEYS)} may change. Resume with the run's config, or train a new run "
            f"into another --out")
