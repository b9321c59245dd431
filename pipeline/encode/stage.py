"""The Ray Data stage: item content in, one feature row per item out, per modality.

image:  rows (item_id, path) -> map_batches(decode, CPU tasks) -> uint8 [B, S, S, 3] + status
        -> map_batches(ImageActor, fixed actor pool, batch_size=B, num_gpus=1 when GPUs exist)
        -> (item_id, status, feature [B, d_i])
text:   rows (item_id, text), ordered by length -> map_batches(TextActor, fixed actor pool)
        -> (item_id, feature [B, d_t])

Each actor loads its model once (in __init__) and reuses it for every batch. The two
modalities run as separate Ray Data executions, one after the other, so each gets the whole
cluster; the driver collects the rows and the caller joins them on item_id
(pipeline.encode.assemble: the rows are gathered on the driver anyway to write the matrices, and
Ray's Dataset.join would add polars as a dependency). Ray wiring only: the model math lives in
the encoder modules.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from pipeline.encode.batching import length_order
from pipeline.encode.encoders import EncoderSpec, build_encoder
from pipeline.encode.images import OK, decode_images
from pipeline.encode.resources import StagePlan, plan_stage

log = logging.getLogger("pipeline.encode")
MAX_BLOCKS = 256


@dataclass
class StageResult:
    """One modality's output, in whatever order Ray produced it.

    item_id: [n] ids; features: float32 [n, d]; status: [n] str for images (ok / missing /
    corrupt), None for text; seconds: wall time of the execution (actor start and model load
    included); plan: the resources it ran with.
    """

    item_id: np.ndarray
    features: np.ndarray
    status: np.ndarray | None
    seconds: float
    plan: StagePlan


# --------------------------------------------------------------------------- Ray lifecycle


def ensure_ray(address: str | None = None) -> bool:
    """Start or join Ray unless it is already initialised; True when this call started it.

    address (or RAY_ADDRESS, as under ``ray job submit``) joins that cluster; otherwise a local
    instance of its own with this machine's CPUs and no dashboard (pipeline.ray_cluster), never
    whichever cluster happens to run on the machine.
    """
    from pipeline.ray_cluster import ensure_ray as start_or_join

    return start_or_join(address, num_cpus=os.cpu_count(), log_to_driver=True)


def cluster_plan(actors: int | None, decode: bool) -> StagePlan:
    """plan_stage for the connected cluster (largest node's CPUs bound a single actor)."""
    import ray

    alive = [node for node in ray.nodes() if node.get("Alive")]
    node_cpus = max((node.get("Resources", {}).get("CPU", 0) for node in alive), default=None)
    return plan_stage(ray.cluster_resources(), node_cpus=node_cpus, actors=actors, decode=decode)


# --------------------------------------------------------------------------- map_batches callables


def _quiet_model_loading() -> None:
    """No weight-loading progress bars or info logs from transformers inside actors. Set through
    the environment (read when transformers is imported), so actors whose encoder does not use
    transformers never import it."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


class TextActor:
    """Holds one text encoder. batch {item_id [B], text [B]} -> {item_id [B], feature [B, d_t]}."""

    def __init__(self, spec: EncoderSpec, device: str, half: bool, threads: int):
        _quiet_model_loading()
        self.encoder = build_encoder(spec, device=device, half=half, threads=threads)

    def __call__(self, batch: dict) -> dict:
        features = self.encoder.encode([str(t) for t in batch["text"]])
        return {"item_id": batch["item_id"], "feature": features}


class ImageActor:
    """Holds one image encoder. batch {item_id, status [B], pixels uint8 [B, S, S, 3]} ->
    {item_id, status, feature float32 [B, d_i]} (zero rows where status != ok)."""

    def __init__(self, spec: EncoderSpec, device: str, half: bool, threads: int):
        _quiet_model_loading()
        self.encoder = build_encoder(spec, device=device, half=half, threads=threads)

    def __call__(self, batch: dict) -> dict:
        ok = batch["status"] == OK
        features = np.zeros((len(ok), self.encoder.dim), dtype=np.float32)
        if ok.any():
            features[ok] = self.encoder.encode(batch["pixels"][ok])
        return {"item_id": batch["item_id"], "status": batch["status"], "feature": features}


def decode_batch(batch: dict, size: int) -> dict:
    """CPU task: batch {item_id, path} -> {item_id, status [B], pixels uint8 [B, S, S, 3]}."""
    pixels, status = decode_images(batch["path"], size)
    return {"item_id": batch["item_id"], "status": status, "pixels": pixels}


# --------------------------------------------------------------------------- the two executions


def encode_texts(item_id: np.ndarray, texts: list[str], spec: EncoderSpec, *, batch_size: int,
                 actors: int | None = None, progress: bool = True) -> StageResult:
    """Text features of every row. item_id [n], texts [n] (already prompted) -> StageResult."""
    import ray.data

    plan = cluster_plan(actors, decode=False)
    ids = np.asarray(item_id).tolist()
    rows = [{"item_id": ids[i], "text": texts[i]} for i in length_order(texts)]
    with _one_progress_bar():
        ds = _dataset(rows, batch_size).map_batches(
            TextActor,
            fn_constructor_kwargs=_actor_args(spec, plan),
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=plan.actors),
            **_actor_resources(plan),
        )
        out, seconds = _collect(ds, len(rows), f"encode text ({spec.label})", progress)
    return StageResult(out["item_id"], out["feature"], None, seconds, plan)


def encode_images(item_id: np.ndarray, paths: list[str], spec: EncoderSpec, *, size: int, batch_size: int,
                  actors: int | None = None, progress: bool = True) -> StageResult:
    """Image features of every row. item_id [n], paths [n] absolute -> StageResult with status."""
    import ray.data

    plan = cluster_plan(actors, decode=True)
    rows = [{"item_id": item, "path": path} for item, path in zip(np.asarray(item_id).tolist(), paths)]
    with _one_progress_bar():
        ds = (_dataset(rows, batch_size)
              .map_batches(decode_batch, fn_kwargs={"size": size}, batch_size=batch_size,
                           compute=ray.data.TaskPoolStrategy(size=plan.decode_tasks), num_cpus=plan.decode_cpus)
              .map_batches(ImageActor, fn_constructor_kwargs=_actor_args(spec, plan), batch_size=batch_size,
                           compute=ray.data.ActorPoolStrategy(size=plan.actors), **_actor_resources(plan)))
        out, seconds = _collect(ds, len(rows), f"encode images ({spec.label})", progress)
    return StageResult(out["item_id"], out["feature"], out["status"].astype(str), seconds, plan)


def _actor_args(spec: EncoderSpec, plan: StagePlan) -> dict:
    return {"spec": spec, "device": plan.device, "half": plan.half, "threads": plan.torch_threads}


def _actor_resources(plan: StagePlan) -> dict:
    resources = {"num_cpus": plan.actor_cpus}
    if plan.actor_gpus:
        resources["num_gpus"] = plan.actor_gpus
    return resources


def _dataset(rows: list[dict], batch_size: int):
    """Rows as a dataset of about one batch per block (at most MAX_BLOCKS blocks), so decode tasks
    and actors stream batch by batch. Blocks are built on the driver (no metadata tasks)."""
    import ray.data

    n_batches = -(-len(rows) // batch_size)
    return ray.data.from_items(rows, override_num_blocks=max(1, min(n_batches, MAX_BLOCKS)))


@contextmanager
def _one_progress_bar():
    """Ray Data's own progress bars off while a dataset is built and run (ours counts items);
    a dataset keeps the context it was created with, so both happen inside."""
    from ray.data import DataContext

    context = DataContext.get_current()
    previous = context.enable_progress_bars
    context.enable_progress_bars = False
    try:
        yield
    finally:
        context.enable_progress_bars = previous


def _collect(ds, total: int, label: str, progress: bool) -> tuple[dict[str, np.ndarray], float]:
    """Run `ds` to the end on the driver: concatenated columns and the wall time; logs items/s."""
    from tqdm import tqdm

    started = time.perf_counter()
    parts: list[dict] = []
    with tqdm(total=total, desc=label, unit="item", disable=not progress, dynamic_ncols=True) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            parts.append(batch)
            bar.update(len(batch["item_id"]))
    seconds = time.perf_counter() - started
    rows = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]} if parts else {}
    if len(rows.get("item_id", ())) != total:
        raise RuntimeError(f"{label}: the stage returned {len(rows.get('item_id', ()))} rows for {total} items")
    log.info("%s: %d items in %.1f s (%.1f items/s)", label, total, seconds, total / max(seconds, 1e-9))
    return rows, seconds
