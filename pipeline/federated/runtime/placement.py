"""How many ClientPools a run starts and what each one reserves, from the cluster's resources.
Pure: no Ray here (the Server passes ray.cluster_resources()).

CPU clusters: one pool per `cpus_per_pool` CPUs (default 1 CPU, one torch thread). Clusters
with GPUs: one pool per GPU, each holding its GPU and an equal share of the CPUs, for an ID
backbone under runtime.device=auto; a model with a fusion module takes the GPUs only when asked
(runtime.device=cuda or runtime.gpus_per_pool > 0): it trains on a GPU too, but how fast has not
been measured against its many CPU pools. Whatever `runtime` sets explicitly wins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class PoolPlan:
    pools: int
    cpus_per_pool: float
    gpus_per_pool: float

    @property
    def threads(self) -> int:
        """torch threads of a pool: its CPUs (at least one)."""
        return max(1, int(self.cpus_per_pool))


def plan_pools(resources: dict[str, float], runtime, fusion: bool = False) -> PoolPlan:
    """resources: {'CPU': n, 'GPU': m, ...} of the cluster; runtime: RuntimeConfig."""
    cpus, gpus = float(resources.get("CPU", 1.0)), float(resources.get("GPU", 0.0))
    asked = runtime.device == "cuda" or (runtime.gpus_per_pool or 0) > 0
    use_gpus = (gpus >= 1 and runtime.device != "cpu" and (asked or not fusion)
                and (runtime.gpus_per_pool is None or runtime.gpus_per_pool > 0))
    if use_gpus:
        pools = runtime.pools or int(gpus)
        if runtime.gpus_per_pool is not None:
            gpus_each = runtime.gpus_per_pool
        else:  # an equal share; Ray takes fractions up to 1 and whole numbers above
            share = gpus / pools
            gpus_each = share if share <= 1 else float(math.floor(share))
        cpus_each = runtime.cpus_per_pool or max(1.0, float(math.floor(cpus / pools)))
        return PoolPlan(pools=pools, cpus_per_pool=cpus_each, gpus_per_pool=gpus_each)
    cpus_each = runtime.cpus_per_pool or 1.0
    pools = runtime.pools or max(1, int(cpus // cpus_each))
    return PoolPlan(pools=pools, cpus_per_pool=cpus_each, gpus_per_pool=runtime.gpus_per_pool or 0.0)
