"""How the encode stage spends the cluster: actors, CPUs/GPUs per actor, torch threads, decode tasks.

Pure functions of the cluster's resources, so the GPU path is decided (and testable) without a
GPU: with GPUs every model actor takes one (``num_gpus=1``, float16); without, the CPUs are
split between the model actors and a small share for the image decode tasks, and every actor
runs as many torch threads as it holds CPUs, so the node is not oversubscribed.

`plan_stage` plans one modality that has the cluster to itself; `plan_pass` plans the one
streaming pass in which the image and the text actors run at the same time and share it.
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


def plan_pass(cluster: dict, modalities: dict[str, bool], *, node_cpus: float | None = None,
              actors: int | None = None) -> dict[str, StagePlan]:
    """Plan the modalities that run at the same time in one pass: modality -> StagePlan.

    modalities: {name: whether its stage decodes images}, in the order the plans are wanted.
    One modality: exactly `plan_stage`. Several, without GPUs: every modality keeps the actor pool
    it would have alone (so the one still running after the other finished can use the whole
    node), and the CPUs, less the decode share, are divided evenly over all their actors (every
    pool starts at once, none waits for resources). With GPUs: the GPUs are divided between the
    modalities (one per actor); with fewer GPUs than modalities, each modality gets one actor
    holding an equal fraction of them.
    """
    names = list(modalities)
    if len(names) == 1:
        return {names[0]: plan_stage(cluster, node_cpus=node_cpus, actors=actors, decode=modalities[names[0]])}
    cpus = float(cluster.get("CPU", 0))
    gpus = int(cluster.get("GPU", 0))
    if cpus < 1:
        raise ValueError(f"the Ray cluster has {cpus:g} CPUs; the encode stage needs at least one")
    node_cpus = min(float(node_cpus or cpus), cpus)
    decoders = [name for name in names if modalities[name]]
    if gpus > 0:
        if gpus >= len(names):
            share = [gpus // len(names) + (i < gpus % len(names)) for i in range(len(names))]
            pools = {name: min(actors or share[i], share[i]) for i, name in enumerate(names)}
            actor_gpus = 1.0
        else:
            pools = dict.fromkeys(names, 1)
            actor_gpus = math.floor(gpus / len(names) * 1000) / 1000
        total = sum(pools.values())
        spare = cpus - total
        decode_cpus = 1.0 if spare >= 1 else DECODE_CPU_SHARE
        actor_cpus = 1.0 if spare >= DECODE_CPU_SHARE * len(decoders) else \
            math.floor((cpus - DECODE_CPU_SHARE * len(decoders)) / total * 1000) / 1000
        decode_tasks = max(1, int(spare)) if spare >= 1 else 1
        return {name: StagePlan(pools[name], actor_cpus, actor_gpus, 1, "cuda", True,
                                decode_tasks if modalities[name] else 0, decode_cpus if modalities[name] else 0.0)
                for name in names}
    nodes = max(1, round(cpus / node_cpus))
    pool = max(1, min(actors or CPU_ACTORS_PER_NODE * nodes, int(cpus)))
    reserve = DECODE_CPU_SHARE * nodes * len(decoders)
    total = pool * len(names)
    per_actor = min((cpus - reserve) / total, node_cpus - DECODE_CPU_SHARE * len(decoders))
    per_actor = math.floor(per_actor * 1000) / 1000  # Ray's resource units; never round up
    threads = max(1, int(per_actor + 0.5))
    return {name: StagePlan(pool, per_actor, 0.0, threads, "cpu", False, nodes if modalities[name] else 0,
                            DECODE_CPU_SHARE if modalities[name] else 0.0) for name in names}
