"""The Ray Data stage: item content in, one feature row per item out, for every modality at once.

image:  rows (item_id, path) -> map_batches(decode, CPU tasks) -> uint8 [B, S, S, 3] + status
        -> map_batches(ImageActor, fixed actor pool, batch_size=B, num_gpus=1 when GPUs exist)
        -> (modality, item_id, status, feature [B, d_i])
text:   rows (item_id, text), ordered by length -> map_batches(TextActor, fixed actor pool)
        -> (modality, item_id, feature [B, d_t])

`encode_pass` runs both branches as ONE streaming execution (Dataset.union): the image and the
text actors start together and work at the same time, sharing the cluster by
pipeline.encode.resources.plan_pass, and the driver reads the rows of both as they come. One
execution instead of two saves the second actor start-up and model load, and neither modality
waits for the other's tail. `encode_images` / `encode_texts` run one modality alone with the
whole cluster (the two-pass way; bench.encode measures one against the other).

Each actor loads its model once (in __init__) and reuses it for every batch. The driver
collects the rows and the caller joins them on item_id (pipeline.encode.assemble: the rows are
gathered on the driver anyway to write the matrices, and Ray's Dataset.join would add polars as
a dependency). Ray wiring only: the model math lives in the encoder modules.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from pipeline.encode.batching import length_order
from pipeline.encode.encoders import IMAGE, TEXT, EncoderSpec, build_encoder
from pipeline.encode.images import OK, decode_images
from pipeline.encode.resources import StagePlan, plan_pass, plan_stage

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

    return plan_stage(ray.cluster_resources(), node_cpus=_largest_node_cpus(), actors=actors, decode=decode)


def cluster_plans(modalities: dict[str, bool], actors: int | None) -> dict[str, StagePlan]:
    """plan_pass for the connected cluster: modality (-> decodes images) -> StagePlan."""
    import ray

    return plan_pass(ray.cluster_resources(), modalities, node_cpus=_largest_node_cpus(), actors=actors)


def _largest_node_cpus() -> float | None:
    import ray

    alive = [node for node in ray.nodes() if node.get("Alive")]
    return max((node.get("Resources", {}).get("CPU", 0) for node in alive), default=None)


# --------------------------------------------------------------------------- map_batches callables


def _quiet_model_loading() -> None:
    """No weight-loading progress bars or info logs from transformers inside actors. Set through
    the environment (read when transformers is imported), so actors whose encoder does not use
    transformers never import it."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


class TextActor:
    """Holds one text encoder. batch {item_id [B], text [B]} -> {modality, item_id [B], feature [B, d_t]}."""

    def __init__(self, spec: EncoderSpec, device: str, half: bool, threads: int):
        _quiet_model_loading()
        self.encoder = build_encoder(spec, device=device, half=half, threads=threads)

    def __call__(self, batch: dict) -> dict:
        features = self.encoder.encode([str(t) for t in batch["text"]])
        return {"modality": np.full(len(features), TEXT), "item_id": batch["item_id"], "feature": features}


class ImageActor:
    """Holds one image encoder. batch {item_id, status [B], pixels uint8 [B, S, S, 3]} ->
    {modality, item_id, status, feature float32 [B, d_i]} (zero rows where status != ok)."""

    def __init__(self, spec: EncoderSpec, device: str, half: bool, threads: int):
        _quiet_model_loading()
        self.encoder = build_encoder(spec, device=device, half=half, threads=threads)

    def __call__(self, batch: dict) -> dict:
        ok = batch["status"] == OK
        features = np.zeros((len(ok), self.encoder.dim), dtype=np.float32)
        if ok.any():
            features[ok] = self.encoder.encode(batch["pixels"][ok])
        return {"modality": np.full(len(ok), IMAGE), "item_id": batch["item_id"], "status": batch["status"],
                "feature": features}


def decode_batch(batch: dict, size: int) -> dict:
    """CPU task: batch {item_id, path} -> {item_id, status [B], pixels uint8 [B, S, S, 3]}."""
    pixels, status = decode_images(batch["path"], size)
    return {"item_id": batch["item_id"], "status": status, "pixels": pixels}


# --------------------------------------------------------------------------- the executions


@dataclass(frozen=True)
class Work:
    """One modality's share of a pass: item_id [n] with, per row, a text (already prompted) or an
    image path (absolute); spec: its encoder; size: the image side S (images only)."""

    modality: str
    item_id: np.ndarray
    content: list[str]
    spec: EncoderSpec
    size: int | None = None

    @property
    def decodes(self) -> bool:
        return self.modality == IMAGE


def encode_pass(works: list[Work], *, batch_size: int, actors: int | None = None,
                progress: bool = True) -> dict[str, StageResult]:
    """Every work's features in ONE streaming execution: modality -> StageResult.

    The branches (one per work) are united into one dataset, so their actor pools run at the
    same time on the plan of pipeline.encode.resources.plan_pass; a StageResult's seconds run
    from the start of the pass to the arrival of that modality's last row."""
    if len({work.modality for work in works}) != len(works):
        raise ValueError(f"one work per modality, got {[work.modality for work in works]}")
    plans = cluster_plans({work.modality: work.decodes for work in works}, actors)
    with _quiet_ray_data():
        branches = [_branch(work, plans[work.modality], batch_size) for work in works]
        ds = branches[0].union(*branches[1:]) if len(branches) > 1 else branches[0]
        labels = {work.modality: f"encode {'images' if work.decodes else work.modality} ({work.spec.label})"
                  for work in works}
        parts, seconds = _collect(ds, {work.modality: len(work.item_id) for work in works}, labels, progress)
    results = {}
    for work in works:
        out = parts[work.modality]
        status = out["status"].astype(str) if work.decodes else None
        results[work.modality] = StageResult(out["item_id"], out["feature"], status, seconds[work.modality],
                                             plans[work.modality])
    return results


def encode_texts(item_id: np.ndarray, texts: list[str], spec: EncoderSpec, *, batch_size: int,
                 actors: int | None = None, progress: bool = True) -> StageResult:
    """Text features of every row, alone on the cluster. item_id [n], texts [n] (already prompted)."""
    return encode_pass([Work(TEXT, np.asarray(item_id), list(texts), spec)], batch_size=batch_size,
                       actors=actors, progress=progress)[TEXT]


def encode_images(item_id: np.ndarray, paths: list[str], spec: EncoderSpec, *, size: int, batch_size: int,
                  actors: int | None = None, progress: bool = True) -> StageResult:
    """Image features of every row, alone on the cluster. item_id [n], paths [n] absolute ->
    StageResult with status."""
    return encode_pass([Work(IMAGE, np.asarray(item_id), list(paths), spec, size)], batch_size=batch_size,
                       actors=actors, progress=progress)[IMAGE]


def _branch(work: Work, plan: StagePlan, batch_size: int):
    """The dataset of one work: rows -> (decode ->) encoder actors."""
    import ray.data

    ids = np.asarray(work.item_id).tolist()
    if work.decodes:
        rows = [{"item_id": item, "path": path} for item, path in zip(ids, work.content)]
        ds = _dataset(rows, batch_size).map_batches(
            decode_batch, fn_kwargs={"size": work.size}, batch_size=batch_size,
            compute=ray.data.TaskPoolStrategy(size=plan.decode_tasks), num_cpus=plan.decode_cpus)
        actor = ImageActor
    else:
        rows = [{"item_id": ids[i], "text": work.content[i]} for i in length_order(work.content)]
        ds = _dataset(rows, batch_size)
        actor = TextActor
    with warnings.catch_warnings():
        # max_restarts reaches Ray only as a free keyword, which Ray 2.60 (pinned) warns will go
        # in Ray 2.64; moving the pin past it means finding its new spelling
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(actor, fn_constructor_kwargs=_actor_args(work.spec, plan), batch_size=batch_size,
                              compute=ray.data.ActorPoolStrategy(size=plan.actors), **_actor_resources(plan))


def _actor_args(spec: EncoderSpec, plan: StagePlan) -> dict:
    return {"spec": spec, "device": plan.device, "half": plan.half, "threads": plan.torch_threads}


def _actor_resources(plan: StagePlan) -> dict:
    """Ray resources of one model actor. max_restarts=0: an actor that dies fails the pass with
    Ray's error instead of being restarted. An encode is short and re-run whole (the store is
    written only at the end), and a restartable actor whose constructor arguments sit in the
    object store, as Ray Data's always do, makes Ray log an error-level line on every run."""
    resources = {"num_cpus": plan.actor_cpus, "max_restarts": 0}
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
def _quiet_ray_data():
    """While a dataset is built and run: Ray Data's own progress bars off (ours count items; a
    dataset keeps the context it was created with, so both happen inside), and Ray Data's
    console shows warnings and errors only. Its INFO lines (execution plan, start and end of every
    execution) still go to ray-data.log in the session's log folder, and its one warning that
    its progress bars are off is dropped, since they are off on purpose."""
    import logging

    from ray.data import DataContext

    context = DataContext.get_current()
    previous = context.enable_progress_bars
    context.enable_progress_bars = False
    console = [h for h in logging.getLogger("ray.data").handlers if type(h).__name__ == "PlainRayHandler"]
    levels = [h.level for h in console]
    progress_logger = logging.getLogger("ray.data._internal.progress")
    progress_level = progress_logger.level
    for handler in console:
        handler.setLevel(max(handler.level, logging.WARNING))
    progress_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        context.enable_progress_bars = previous
        for handler, level in zip(console, levels):
            handler.setLevel(level)
        progress_logger.setLevel(progress_level)


def _collect(ds, totals: dict[str, int], labels: dict[str, str], progress: bool
             ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, float]]:
    """Run `ds` to the end on the driver, one progress bar per modality: modality -> concatenated
    columns, and modality -> seconds from the start until its last row; logs items/s."""
    from tqdm import tqdm

    started = time.perf_counter()
    parts: dict[str, list[dict]] = {modality: [] for modality in totals}
    seconds = dict.fromkeys(totals, 0.0)
    bars = {modality: tqdm(total=totals[modality], desc=labels[modality], unit="item", disable=not progress,
                           dynamic_ncols=True, position=index, leave=True)
            for index, modality in enumerate(totals)}
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for modality in np.unique(batch["modality"]).tolist():
                mine = batch["modality"] == modality
                parts[modality].append({key: value[mine] for key, value in batch.items() if key != "modality"})
                bars[modality].update(int(mine.sum()))
                seconds[modality] = time.perf_counter() - started
    finally:
        for bar in bars.values():
            bar.close()
    rows = {}
    for modality, total in totals.items():
        found = parts[modality]
        rows[modality] = {key: np.concatenate([part[key] for part in found]) for key in found[0]} if found else {}
        got = len(rows[modality].get("item_id", ()))
        if got != total:
            raise RuntimeError(f"{labels[modality]}: the stage returned {got} rows for {total} items")
        log.info("%s: %d items in %.1f s (%.1f items/s)", labels[modality], total, seconds[modality],
                 total / max(seconds[modality], 1e-9))
    return rows, seconds
