"""Shared helpers of the engine benchmarks: threads, timing, peak RSS, GEMM peak, the JSON line.

No psutil: resident memory comes from resource.getrusage and /proc/self (Linux). Every
benchmark measures the thing and its baseline in one process (the machine may be shared and
noisy), prints readable lines, and ends with exactly one JSON line of its figures (emit_json).
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import platform
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass

GB = 1 << 30
MB = 1 << 20


# --- threads and machine -----------------------------------------------------------------------


def set_threads(threads: int) -> int:
    """torch intra-op threads for everything measured in this process (both sides of a ratio)."""
    import torch

    torch.set_num_threads(max(1, int(threads)))
    return torch.get_num_threads()


def machine_line(threads: int) -> str:
    import torch

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"machine: {os.cpu_count()} cores, {platform.machine()}, python {platform.python_version()}, "
            f"torch {torch.__version__}; torch threads {threads}; load average (1/5/15 min) {load}")


def loadavg_1min() -> float:
    return float(os.getloadavg()[0])


# --- timing ------------------------------------------------------------------------------------


@dataclass
class Span:
    """Wall-clock and process CPU seconds of one timed block."""

    wall: float = 0.0
    cpu: float = 0.0

    def __iadd__(self, other: "Span") -> "Span":
        self.wall += other.wall
        self.cpu += other.cpu
        return self


@contextmanager
def timed():
    """with timed() as span: ...  -> span.wall, span.cpu (process CPU time, all threads)."""
    span = Span()
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield span
    finally:
        span.wall = time.perf_counter() - wall
        span.cpu = time.process_time() - cpu



class CallMeter:
    """Wall and process-CPU seconds of named calls inside a round that rounds.run_rounds plays:
    wrap(obj, "train") replaces obj.train (an instance attribute, e.g. of the in-process pools or
    the strategy's GroupServer) by the same call, timed, and optionally run inside `around` (a
    reusable context manager such as a FLOP meter). The round loop itself is untouched; take()
    returns what was measured since the last take() and starts again."""

    def __init__(self):
        self.spans: dict[str, Span] = {}

    def wrap(self, obj, name: str, around=None) -> None:
        original = getattr(obj, name)

        def call(*args, **kwargs):
            with timed() as span:
                if around is None:
                    out = original(*args, **kwargs)
                else:
                    with around:
                        out = original(*args, **kwargs)
            self.spans.setdefault(name, Span())
            self.spans[name] += span
            return out

        setattr(obj, name, call)

    def take(self) -> dict[str, Span]:
        spans, self.spans = self.spans, {}
        return spans


def no_evaluation(rounds: int) -> list[str]:
    """Config overrides under which the first `rounds` rounds schedule no evaluation (a benchmark
    that times training plays the product's rounds with evaluation off, not another loop); the
    run's length (train.rounds, 100 by default) is raised only when it is too short for them."""
    return ["train.eval_round0=false", f"train.eval_every={rounds + 1}",
            *([f"train.rounds={rounds + 1}"] if rounds >= 100 else [])]


# --- memory ------------------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    """Peak resident set size (getrusage ru_maxrss, KiB on Linux). Since it started, unless
    reset_phase_peak() was called: use process_peak_rss_bytes() then."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def current_rss_bytes() -> int:
    """Resident set size now (/proc/self/statm); falls back to the peak where /proc is missing."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


_PEAK_BEFORE_RESETS = 0  # the largest high-water mark seen before a reset_phase_peak()


def reset_phase_peak() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (Linux: `5` > clear_refs), so
    phase_peak_rss_bytes() reports the peak of the phase that starts now. False if unsupported.
    The reset also lowers what getrusage reports; process_peak_rss_bytes() keeps the true peak."""
    global _PEAK_BEFORE_RESETS
    _PEAK_BEFORE_RESETS = max(_PEAK_BEFORE_RESETS, phase_peak_rss_bytes(), peak_rss_bytes())
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _proc_kib_field(path: str, field: str) -> int | None:
    """Bytes of a 'Field:  N kB' line of a /proc file, or None where unreadable."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def phase_peak_rss_bytes() -> int:
    """Peak RSS since the last reset_phase_peak() (VmHWM), or since start where unsupported."""
    peak = _proc_kib_field("/proc/self/status", "VmHWM")
    return peak if peak is not None else peak_rss_bytes()


def process_peak_rss_bytes() -> int:
    """Peak RSS of this process since it started, across reset_phase_peak() calls."""
    return max(_PEAK_BEFORE_RESETS, phase_peak_rss_bytes(), peak_rss_bytes())


def mem_available_bytes() -> int | None:
    return _proc_kib_field("/proc/meminfo", "MemAvailable")


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc malloc_trim)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def gb(n_bytes: float | None) -> float | None:
    return None if n_bytes is None else n_bytes / GB


# --- GEMM peak ---------------------------------------------------------------------------------


def gemm_peak_gflops(n: int = 2048, repeats: int = 5, device: str = "cpu") -> dict:
    """Best-of-`repeats` GFLOP/s of torch.mm on two n x n float32 matrices (2 n^3 FLOPs),
    at the current torch thread count (on `device`; cuda with torch's default float32
    matmul precision): the attainable dense-compute peak of this machine."""
    import torch

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(device)
    b = torch.randn(n, n, generator=generator).to(device)
    out = torch.empty(n, n, device=device)
    torch.mm(a, b, out=out)  # warm-up (allocations, kernel selection)
    synchronize(device)
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b, out=out)
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return {"n": n, "repeats": repeats, "best_seconds": best, "gflops": 2.0 * n ** 3 / best / 1e9,
            "device": str(device)}


def synchronize(device) -> None:
    """Wait for the queued kernels of a CUDA device (no-op on the CPU): timings need it."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def device_line(device: str) -> str:
    """What the device is, for the printout."""
    import torch

    if torch.device(device).type != "cuda":
        return "device: cpu"
    props = torch.cuda.get_device_properties(torch.device(device))
    return f"device: {props.name}, {props.total_memory / GB:.0f} GB, torch {torch.__version__}, CUDA {torch.version.cuda}"


# --- output ------------------------------------------------------------------------------------


def _clean(value):
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python, tuples -> lists, nested."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def emit_json(figures: dict) -> str:
    """Print the benchmark's figures as exactly one JSON line (the last line of its output)."""
    line = json.dumps(_clean(figures), sort_keys=True, allow_nan=False)
    print(line, flush=True)
    return line


def fmt_s(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds:.3f} s"
