"""pipeline/federated/memory.py: freed big blocks stay in the process and are reused."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys
import torch
from pipeline.federated.memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
x = torch.ones(1)
for step in range(30):  # a step frees its tensors, the next step allocates the same sizes
    if step == 10:  # (the heap settles in the first steps)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    del x
    x = torch.ones(64 << 20 >> 2)  # 64 MB
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_freed_blocks_are_reused_without_page_faults():
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    default, kept = faults("default"), faults("keep")
    pages = 20 * (64 << 20) // resource.getpagesize()
    assert default > pages // 2  # every fresh mmap'd tensor faults its pages in again
    assert kept < pages // 10  # the same blocks come back from the heap, already mapped
