"""How the encode stage spends the cluster: actors, CPUs/GPUs per actor, torch threads, decode tasks.

A pure function of the cluster's resources, so the GPU path is decided (and testable) without a
GPU: with GPUs every model actor takes one (``num_gpus=1``, float16); without, the CPUs are
split between the model actors and a small share for the image decode tasks, and every actor
runs as many torch threads as it holds CPUs, so the node is not oversubscribed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# Decoding and resizing one poster costs about 1 ms against 30-50 ms for EfficientNet-Lite0 on a
# CPU core, so on a CPU-only node the decode tasks get a quarter core, not a whole one.
DECODE_CPU_SHARE = 0.25
# Without GPUs, several single- or few-threaded actors beat one actor with many threads for these
# small models (intra-op parallelism scales poorly at batch 32, and collapses when the cores are
# shared with other work); up to this many actors per node share the node's CPUs.
CPU_ACTORS_PER_NODE = 4


@dataclass(frozen=True)
class StagePlan:
    """Resources of one modality's stage.

    actors: size of the fixed actor pool; actor_cpus / actor_gpus: per actor (Ray logical units);
    torch_threads: intra-op threads per actor; device: "cuda" or "cpu"; half: float16 weights;
    decode_tasks: concurrent image decode tasks (0 for text); decode_cpus: CPUs per decode task.
    """

    actors: int
    actor_cpus: float
    actor_gpus: float
    torch_threads: int
    device: str
    half: bool
    decode_tasks: int
    decode_cpus: float

    def as_dict(self) -> dict:
        return asdict(self)


def plan_stage(cluster: dict, *, node_cpus: float | None = None, actors: int | None = None,
               decode: bool = False) -> StagePlan:
    """Plan one stage from ``ray.cluster_resources()``-style totals.

    cluster: {"CPU": total CPUs, "GPU": total GPUs, ...}; node_cpus: CPUs of the largest node
    (an actor cannot span nodes; default: all on one node); actors: requested pool size
    (default: one per GPU, else up to CPU_ACTORS_PER_NODE per node); decode: reserve room for the
    image decode tasks.
    """
    cpus = float(cluster.get("CPU", 0))
    gpus = int(cluster.get("GPU", 0))
    if cpus < 1:
        raise ValueError(f"the Ray cluster has {cpus:g} CPUs; the encode stage needs at least one")
    node_cpus = min(float(node_cpus or cpus), cpus)
    if gpus > 0:
        pool = min(actors or gpus, gpus)
        spare = cpus - pool
        decode_tasks = max(1, int(spare)) if decode else 0
        decode_cpus = 1.0 if spare >= 1 else DECODE_CPU_SHARE
        return StagePlan(pool, 1.0, 1.0, 1, "cuda", True, decode_tasks, decode_cpus if decode else 0.0)
    nodes = max(1, round(cpus / node_cpus))
    pool = max(1, min(actors or CPU_ACTORS_PER_NODE * nodes, int(cpus)))
    reserve = DECODE_CPU_SHARE * nodes if decode else 0.0
    per_actor = min((cpus - reserve) / pool, node_cpus - (DECODE_CPU_SHARE if decode else 0.0))
    per_actor = math.floor(per_actor * 1000) / 1000  # Ray's resource units; never round up
    threads = max(1, int(per_actor + 0.5))
    return StagePlan(pool, per_actor, 0.0, threads, "cpu", False,
                     nodes if decode else 0, DECODE_CPU_SHARE if decode else 0.0)
