"""What a pool trained on, for run summaries: float results of the same seed can differ in their
last bits between CPU models (BLAS kernels chosen per instruction set) and thread counts, so a
summary names them. Pure: no Ray."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import torch


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else platform.processor()), '' if unknown."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor()


def describe(device: str = "cpu") -> dict:
    """{'cpu', 'cpu_capability' (the kernels torch dispatches to, e.g. AVX2), 'torch_threads',
    'gpu' (None on CPU), 'python', 'torch', 'numpy'} of this process."""
    return {"cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
            "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size since it started (Linux /proc VmHWM; None elsewhere)."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    for line in status.read_text(errors="replace").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    return None
