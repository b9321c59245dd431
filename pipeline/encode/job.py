"""encode_items: catalogue -> (reuse check) -> one Ray Data pass, every modality at once -> join -> feature store.

The one entry point behind the CLI (`python -m pipeline encode`), the Ray job
(jobs/encode_items.py) and the rest of the project.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipeline.data.schema import Catalogue, DataError
from pipeline.encode.assemble import fill_with_mean, join_on_item_id
from pipeline.encode.catalogue import ItemTable, content_hash, from_catalogue, read_catalogue
from pipeline.encode.config import EncodeConfig
from pipeline.encode.encoders import IMAGE, TEXT, describe
from pipeline.encode.images import CORRUPT, MISSING, OK, is_file
from pipeline.encode import store

log = logging.getLogger("pipeline.encode")

NORMALISATION = ("L2: every row has unit norm; an item without usable content for a modality gets the "
                 "L2-normalised mean of that modality's encoded rows")
RESIZE = "short side to S (bicubic), centre crop S x S, RGB"


def encode_items(catalogue, out, config: EncodeConfig | None = None, *, force: bool = False,
                 progress: bool = True, ray_address: str | None = None, overwrite: bool = True,
                 inputs=()) -> dict:
    """Encode a catalogue into the feature store at `out` and return its manifest.

    catalogue: a catalogue file or folder (see pipeline.encode.catalogue), a loader's
    Catalogue, or an ItemTable. Re-running on unchanged inputs and settings reuses the store
    (no Ray, no model) unless `force`. The returned manifest has two extra keys: "reused" and
    "path". Bad input raises DataError and leaves `out` untouched. `out` must not overlap the
    catalogue or `inputs`, nor hold anything but an earlier store, which is replaced only with
    `overwrite` (pipeline.outputs.check_output raises OutputError before Ray starts).
    """
    from pipeline.outputs import check_output

    inputs = [*inputs, *([catalogue] if isinstance(catalogue, (str, Path)) else [])]
    check_output(out, store.STORE_OUTPUT, inputs=inputs, overwrite=True)  # overlap or another's folder
    config = config or EncodeConfig()
    started = time.perf_counter()
    table = _table(catalogue)
    specs = {m: s for m, s in ((TEXT, config.text_spec), (IMAGE, config.image_spec)) if s.enabled}
    models = {m: _describe(s) for m, s in specs.items()}
    input_hash = content_hash(table)
    key = store_key(input_hash, config, models)
    if not force and (manifest := store.reusable(out, key)) is not None:
        log.info("feature store %s is up to date (inputs %s); reusing it", out, input_hash[:12])
        return {**manifest, "reused": True, "path": str(out)}

    check_output(out, store.STORE_OUTPUT, inputs=inputs, overwrite=overwrite)  # an earlier store: --overwrite
    texts = config.prompted_texts(table.text, table.title) if TEXT in specs else None
    empty_text = table.text == ""
    has_file = np.array([is_file(p) for p in table.image], dtype=bool)
    _check_inputs(table, config, specs, empty_text, has_file)

    from pipeline.encode import stage

    works = []
    if IMAGE in specs:
        rows = np.flatnonzero(has_file)
        works.append(stage.Work(IMAGE, table.item_id[rows], list(table.image[rows]), specs[IMAGE],
                                size=models[IMAGE]["size"]))
    if TEXT in specs:
        rows = np.arange(len(table)) if config.empty_text_policy() == "missing" else np.flatnonzero(~empty_text)
        works.append(stage.Work(TEXT, table.item_id[rows], [texts[r] for r in rows], specs[TEXT]))
    started_ray = stage.ensure_ray(ray_address)
    try:  # images and text in one streaming pass, their actors at work at the same time
        results = stage.encode_pass(works, batch_size=config.batch_size, actors=config.actors, progress=progress)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    if IMAGE in results:  # image failures are found only by decoding
        _check_images(table, results[IMAGE], empty_text if TEXT in specs else None)

    matrices, modalities = {}, {}
    if IMAGE in results:
        matrices[IMAGE], modalities[IMAGE] = _image_part(table, results[IMAGE], models[IMAGE])
    if TEXT in results:
        matrices[TEXT], modalities[TEXT] = _text_part(table, results[TEXT], models[TEXT], config, empty_text)
    seconds = time.perf_counter() - started
    manifest = {
        "catalogue": table.source,
        "input_hash": input_hash,
        "key": key,
        "item_id_dtype": str(table.item_id.dtype),
        "normalisation": NORMALISATION,
        "modalities": {m: modalities[m] for m in (TEXT, IMAGE) if m in modalities},
        "run": _run_info(results, config, seconds, len(table)),
    }
    store.write_store(out, table.item_id, {m: matrices[m] for m in (TEXT, IMAGE) if m in matrices}, manifest)
    log.info("wrote feature store %s: %d items (%s) in %.1f s (%.1f items/s)", out, len(table),
             ", ".join(f"{m} {v['dim']}-d" for m, v in manifest["modalities"].items()), seconds,
             len(table) / seconds)
    return {**store.read_manifest(out), "reused": False, "path": str(out)}


def store_key(input_hash: str, config: EncodeConfig, models: dict) -> str:
    """What a store depends on: the inputs' content and every setting that changes a feature."""
    settings = {"format": store.FORMAT, "inputs": input_hash, "models": models,
                "prompt": config.template() if TEXT in models else None,
                "empty_text": config.empty_text_policy() if TEXT in models else None,
                "resize": RESIZE if IMAGE in models else None}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


def _table(catalogue) -> ItemTable:
    if isinstance(catalogue, ItemTable):
        return catalogue
    if isinstance(catalogue, Catalogue):
        return from_catalogue(catalogue)
    return read_catalogue(catalogue)


def _describe(spec) -> dict:
    try:
        return describe(spec)
    except ValueError as error:
        raise DataError(spec.label, str(error), column=f"{spec.modality}_model") from None


def _check_inputs(table: ItemTable, config: EncodeConfig, specs: dict, empty_text, has_file) -> None:
    """Refuse runs that cannot produce a feature for some requested modality (before Ray starts)."""
    n = len(table)
    no_text = TEXT not in specs or empty_text.all()
    no_image = IMAGE not in specs or not has_file.any()
    if no_text and no_image:
        parts = ([f"all {n} texts are empty"] if TEXT in specs else []) + \
                ([f"none of the {n} images exists"] if IMAGE in specs else [])
        raise DataError(table.source, f"every input is bad: {' and '.join(parts)}; nothing to encode")
    if TEXT in specs and empty_text.all() and config.empty_text_policy() == "mean":
        raise DataError(table.source, f"all {n} texts are empty, so there is no text feature to average; "
                                      "use --text-model none to encode images only", column="text")
    if IMAGE in specs and not has_file.any():
        raise DataError(table.source, f"none of the {n} images exists (item {table.item_id[0]!r}: "
                                      f"{table.image[0] or 'no path'!r}); use --image-model none to encode "
                                      "text only", column="image_path")


def _check_images(table: ItemTable, result, empty_text) -> None:
    """After decoding: at least one image must be usable."""
    if (result.status == OK).any():
        return
    n = len(table)
    if empty_text is not None and empty_text.all():
        raise DataError(table.source, f"every input is bad: all {n} texts are empty and none of the {n} "
                                      "images could be read")
    first = result.item_id[0] if len(result.item_id) else table.item_id[0]
    raise DataError(table.source, f"none of the {n} images could be read (missing or corrupt; first: item "
                                  f"{first!r}); use --image-model none to encode text only", column="image_path")


def _ids(item_ids: np.ndarray, mask: np.ndarray) -> dict:
    return {"count": int(mask.sum()), "ids": item_ids[mask].tolist()}


def _image_part(table: ItemTable, result, model: dict) -> tuple[np.ndarray, dict]:
    matrix, present = join_on_item_id(table.item_id, result.item_id, result.features)
    status = np.full(len(table), MISSING, dtype=object)
    status[np.searchsorted(table.item_id, np.asarray(result.item_id).astype(table.item_id.dtype))] = result.status
    good = present & (status == OK)
    info = {**model, "dim": int(matrix.shape[1]), "input_size": model["size"], "resize": RESIZE,
            "encoded": int(good.sum()), "fallback": "mean",
            "missing": _ids(table.item_id, status == MISSING), "corrupt": _ids(table.item_id, status == CORRUPT)}
    info.pop("size")
    return fill_with_mean(matrix, good), info


def _text_part(table: ItemTable, result, model: dict, config: EncodeConfig, empty) -> tuple[np.ndarray, dict]:
    matrix, present = join_on_item_id(table.item_id, result.item_id, result.features)
    policy = config.empty_text_policy()
    info = {**model, "dim": int(matrix.shape[1]), "prompt": config.template(), "empty_text": policy,
            "encoded": int(present.sum()),
            "fallback": "mean" if policy == "mean" else "the prompt with the word 'missing'",
            "empty": _ids(table.item_id, empty)}
    return (fill_with_mean(matrix, present) if policy == "mean" else matrix), info


def _run_info(results: dict, config: EncodeConfig, seconds: float, n: int) -> dict:
    import ray

    stages = {m: {"items": len(r.item_id), "seconds": round(r.seconds, 3),
                  "items_per_s": round(len(r.item_id) / max(r.seconds, 1e-9), 2), "plan": r.plan.as_dict()}
              for m, r in results.items()}
    return {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seconds": round(seconds, 3),
            "items_per_s": round(n / max(seconds, 1e-9), 2), "batch_size": config.batch_size,
            "pass": "one streaming pass: every modality's actors at work at the same time (a stage's "
                    "seconds: from the start of the pass to its last row)",
            "stages": stages, "ray_version": ray.__version__}
