"""pipeline/federated/engine/memory.py: freed big blocks stay in the process and are reused."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys
import torch
from pipeline.federated.engine.memory import keep_freed_memory
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


POOL_SCRIPT = """
import sys
sys.path[:0] = ["tests/equivalence", "tests/helpers"]
import numpy as np, torch
from bench._common import current_rss_bytes
from pipeline.config import load_config
from pipeline.federated.engine.memory import keep_freed_memory
from pipeline.federated.rounds import in_process, run_rounds
from test_equivalence import synthetic
from test_fedmr_equivalence import with_features

torch.set_num_threads(1)
data = with_features(synthetic())
cfg = load_config(None, ["model.backbone=fcf", "model.dim=8", "model.fusion={d_f: 8, d_r: 6, dropout: 0.2}",
                         "train.eval_round0=false", "train.eval_every=10"])
strategy, pools = in_process(cfg, data)  # one pool, as a pool process holds it
run_rounds(strategy, pools, rounds=2)
shard, g = pools.pools[0], strategy.globals
if sys.argv[1] == "kept_for_good":  # the pool configuration that let evaluations ratchet up
    keep_freed_memory()
kept, rss = [], []
for step in range(10):
    shard.evaluate(g, "p3", "valid", (10,), users=np.arange(0, data.n_users, 1 + step % 3))
    # what the evaluation of a large shard allocates: blocks of varied sizes (32 MB, 48 MB, ...)
    # freed once ranked, and small results that outlive them
    block = torch.empty((32 + 16 * step) << 18).fill_(1.0)
    kept.append(torch.ones(3000 + step))
    del block
    rss.append(current_rss_bytes())
print(rss[0], rss[-1])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_evaluations_in_a_pool_do_not_ratchet_memory_up():
    """A pool that trained FedMR rounds and then evaluates again and again: its resident set
    stays where the first evaluation left it (a training round keeps freed memory only while it
    runs, memory.freed_memory_kept). Kept for good, the same evaluations grow it by every
    block's size."""
    def growth_mb(mode):
        out = subprocess.run([sys.executable, "-c", POOL_SCRIPT, mode], capture_output=True, text=True, check=True)
        first, last = map(int, out.stdout.split()[-2:])
        return (last - first) / 2 ** 20

    assert growth_mb("pool") < 32
    assert growth_mb("kept_for_good") > 96  # the test has teeth: blocks 2-10 are 48..176 MB
