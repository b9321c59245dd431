"""Benchmark: the Ray Data encode stage against a plain PyTorch loop with the same encoders.

    python -m bench.encode            # all 1,682 MovieLens-100K-MM items (posters + title/overview)
    python -m bench.encode --quick    # a subset, under a minute

Both paths run in this one process on the same items, in the same row order, with the same
encoders, batch size, decode function and torch threads per core:

- plain: one Python loop; torch uses every core (--plain-threads); decode -> encode, batch after batch;
- ray:   pipeline.encode.stage (decode in CPU tasks, encoders in a fixed actor pool).

Each path's time runs from "here are the items" to "features in memory" and includes loading
the models (and, for Ray, starting the actors); starting Ray itself is reported separately.
items/s = items / (text seconds + image seconds). The features of the two paths are compared
(max |difference|) to show that they computed the same thing. The last line printed is one
JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

DATA = Path(os.environ.get("FEDMM_SHARED", "/work/shared")) / "data" / "movielens-100k-mm"
QUICK_ITEMS = 32  # a smoke run: fixed start-up costs dominate, so its ratio means little
TARGET = 0.9


def load_items(data: Path, limit: int | None):
    """MovieLens-100K-MM as the stage's ItemTable (first `limit` items by id)."""
    from pipeline.data.loaders import load
    from pipeline.encode.catalogue import ItemTable, from_catalogue

    table = from_catalogue(load("movielens-mm", data).catalogue, source=f"movielens-mm:{data}")
    if limit:
        table = ItemTable(table.item_id[:limit], table.text[:limit], table.image[:limit], table.source)
    return table


def plain_loop(table, config, size: int, threads: int) -> dict:
    """The reference: a single-process PyTorch loop. Returns per-modality (ids, features, seconds)."""
    import torch

    from pipeline.encode.batching import batches, length_order
    from pipeline.encode.encoders import build_encoder
    from pipeline.encode.images import OK, decode_images

    torch.set_num_threads(threads)
    out = {}
    started = time.perf_counter()
    encoder = build_encoder(config.image_spec)
    rows = np.flatnonzero([bool(p) and Path(p).is_file() for p in table.image])
    ids, feats = [], []
    for part in batches(len(rows), config.batch_size):
        pixels, status = decode_images(table.image[rows[part]], size)
        ok = status == OK
        if ok.any():
            ids.append(table.item_id[rows[part]][ok])
            feats.append(encoder.encode(pixels[ok]))
    out["image"] = (np.concatenate(ids), np.concatenate(feats), time.perf_counter() - started)
    del encoder

    started = time.perf_counter()
    encoder = build_encoder(config.text_spec)
    texts = config.prompted_texts(table.text)
    order = length_order(texts)
    feats = [encoder.encode([texts[i] for i in order[part]]) for part in batches(len(order), config.batch_size)]
    out["text"] = (table.item_id[order], np.concatenate(feats), time.perf_counter() - started)
    return out


def ray_stage(table, config, size: int, threads: int = 0) -> dict:
    """The stage under test. Returns per-modality (ids, features, seconds) and the plans."""
    from pipeline.encode import stage
    from pipeline.encode.images import OK

    rows = np.flatnonzero([bool(p) and Path(p).is_file() for p in table.image])
    images = stage.encode_images(table.item_id[rows], list(table.image[rows]), config.image_spec, size=size,
                                 batch_size=config.batch_size, actors=config.actors, progress=False)
    ok = images.status == OK
    texts = stage.encode_texts(table.item_id, config.prompted_texts(table.text), config.text_spec,
                               batch_size=config.batch_size, actors=config.actors, progress=False)
    return {"image": (images.item_id[ok], images.features[ok], images.seconds),
            "text": (texts.item_id, texts.features, texts.seconds),
            "plans": {"image": images.plan.as_dict(), "text": texts.plan.as_dict()}}


def _max_diff(a, b) -> float:
    """Largest |difference| between two (ids, features) results after aligning on id."""
    ids_a, feats_a = a[0], a[1]
    ids_b, feats_b = b[0], b[1]
    if sorted(ids_a.tolist()) != sorted(ids_b.tolist()):
        return float("inf")
    return float(np.abs(feats_a[np.argsort(ids_a)] - feats_b[np.argsort(ids_b)]).max())


def _figures(n: int, result: dict) -> dict:
    seconds = result["text"][2] + result["image"][2]
    return {"items_per_s": round(n / seconds, 2), "seconds": round(seconds, 2),
            "text_s": round(result["text"][2], 2), "image_s": round(result["image"][2], 2),
            "text_items_per_s": round(n / result["text"][2], 2),
            "image_items_per_s": round(len(result["image"][0]) / result["image"][2], 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench.encode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"first {QUICK_ITEMS} items only")
    parser.add_argument("--items", type=int, help="first N items (default all, or the --quick subset)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--actors", type=int, help="model actors per modality (default: the stage's plan)")
    parser.add_argument("--text-model", default="minilm")
    parser.add_argument("--image-model", default="efficientnet-lite0")
    parser.add_argument("--plain-threads", type=int, default=os.cpu_count(),
                        help="torch threads of the plain loop (default: every core, torch's default)")
    parser.add_argument("--repeats", type=int, default=1, help="alternate plain/ray this many times; "
                                                               "figures are the medians")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import ray

    from pipeline.encode import stage
    from pipeline.encode.config import EncodeConfig
    from pipeline.encode.encoders import describe

    config = EncodeConfig(text_model=args.text_model, image_model=args.image_model, batch_size=args.batch_size,
                          actors=args.actors)
    table = load_items(args.data, args.items or (QUICK_ITEMS if args.quick else None))
    n = len(table)
    size = describe(config.image_spec)["size"]
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    stage.ensure_ray()
    ray_init_s = time.perf_counter() - started
    print(f"{n} items, batch {config.batch_size}, {os.cpu_count()} CPUs (load average {load_before:.1f}: the "
          f"machine may be shared), Ray started in {ray_init_s:.1f} s")

    runs = {"plain": [], "ray": []}
    results = {}
    try:
        for repeat in range(args.repeats):
            for name, fn in (("plain", plain_loop), ("ray", ray_stage)):
                results[name] = fn(table, config, size, args.plain_threads)
                runs[name].append(_figures(n, results[name]))
                print(f"  [{repeat + 1}/{args.repeats}] {name:5s} {runs[name][-1]['items_per_s']:7.2f} items/s "
                      f"(text {runs[name][-1]['text_s']:.1f} s, image {runs[name][-1]['image_s']:.1f} s)")
        resources = ray.cluster_resources()
    finally:
        ray.shutdown()

    def median(name, key):
        return float(np.median([run[key] for run in runs[name]]))

    plain = {key: median("plain", key) for key in runs["plain"][0]}
    ray_fig = {key: median("ray", key) for key in runs["ray"][0]}
    ratio = ray_fig["items_per_s"] / plain["items_per_s"]
    figures = {
        "bench": "encode", "dataset": "movielens-100k-mm", "items": n,
        "images": int(len(results["ray"]["image"][0])), "quick": bool(args.quick),
        "text_model": config.text_model, "image_model": config.image_model, "batch_size": config.batch_size,
        "plain": plain, "ray": ray_fig, "ratio": round(ratio, 3), "target_ratio": TARGET,
        "meets_target": ratio >= TARGET, "repeats": args.repeats, "runs": runs,
        "note": "quick: start-up costs dominate; the full run gives the ratio" if args.quick else "",
        "max_abs_diff": {m: _max_diff(results["plain"][m], results["ray"][m]) for m in ("text", "image")},
        "plain_threads": args.plain_threads, "ray_plans": results["ray"]["plans"], "ray_init_s": round(ray_init_s, 2),
        "cluster": {"CPU": resources.get("CPU", 0), "GPU": resources.get("GPU", 0)},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__,
                    "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]},
    }
    print(f"plain loop  {plain['items_per_s']:8.2f} items/s   (text {plain['text_items_per_s']:.1f}/s, "
          f"image {plain['image_items_per_s']:.1f}/s)")
    print(f"Ray Data    {ray_fig['items_per_s']:8.2f} items/s   (text {ray_fig['text_items_per_s']:.1f}/s, "
          f"image {ray_fig['image_items_per_s']:.1f}/s)")
    print(f"ratio Ray/plain {ratio:.3f} (target >= {TARGET}); max |diff| text "
          f"{figures['max_abs_diff']['text']:.2e}, image {figures['max_abs_diff']['image']:.2e}")
    print(json.dumps(figures, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
