"""Benchmark: the encode stage's one streaming pass against the two modality passes it replaced.

    python -m bench.encode            # all 1,682 MovieLens-100K-MM items (posters + title/overview)
    python -m bench.encode --quick    # a few items, under a minute: a smoke run, its ratio means little

Both ways run in this one process, on one Ray instance, on the same items with the same encoders,
batch size and decode function:

- two passes: images alone on the cluster (decode tasks -> image actors), then text alone (text
  actors), each its own Ray Data execution with the whole cluster (pipeline.encode.stage's
  encode_images, then encode_texts: how encoding ran before);
- one pass:   both branches united into one execution, the image and the text actors at work at
  the same time (pipeline.encode.stage.encode_pass: how `python -m pipeline encode` runs now).

Each way's time runs from "here are the items" to "features of both modalities in memory" and
includes starting the actors and loading the models; starting Ray itself is reported separately.
ratio = two-pass seconds / one-pass seconds (>= 1: the one pass is at least as fast as the sum of
the two). With --repeats R the two ways alternate which goes first; the figures are medians, and
the ratio is the median of the R per-repeat ratios (each from two back-to-back runs, so a load
that changes over minutes on a shared machine weighs on both sides of it). Every run prints the
1-minute load average before and after it.
The features of the two ways are compared (max |difference| after aligning on item id) to show
that they computed the same thing. The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

from bench._common import emit_json, loadavg_1min

DATA = Path(os.environ.get("FEDMM_SHARED", "/work/shared")) / "data" / "movielens-100k-mm"
QUICK_ITEMS = 16  # a smoke run: actor start-up dominates, so its ratio means little


def load_items(data: Path, limit: int | None):
    """MovieLens-100K-MM as the stage's ItemTable (first `limit` items by id)."""
    from pipeline.data.loaders import load
    from pipeline.encode.catalogue import ItemTable, from_catalogue

    table = from_catalogue(load("movielens-mm", data).catalogue, source=f"movielens-mm:{data}")
    if limit:
        table = ItemTable(table.item_id[:limit], table.text[:limit], table.image[:limit], table.source)
    return table


def works(table, config, size: int) -> list:
    """The image and the text work of the items, as `python -m pipeline encode` builds them."""
    from pipeline.encode.images import is_file
    from pipeline.encode.stage import Work

    rows = np.flatnonzero([is_file(p) for p in table.image])
    return [Work("image", table.item_id[rows], list(table.image[rows]), config.image_spec, size=size),
            Work("text", table.item_id, config.prompted_texts(table.text), config.text_spec)]


def two_passes(items, config) -> tuple[dict, float]:
    """Images alone, then text alone: ({modality: StageResult}, seconds)."""
    from pipeline.encode import stage

    image, text = items
    started = time.perf_counter()
    results = {"image": stage.encode_images(image.item_id, image.content, image.spec, size=image.size,
                                            batch_size=config.batch_size, actors=config.actors, progress=False),
               "text": stage.encode_texts(text.item_id, text.content, text.spec, batch_size=config.batch_size,
                                          actors=config.actors, progress=False)}
    return results, time.perf_counter() - started


def one_pass(items, config) -> tuple[dict, float]:
    """Both at once in one streaming execution: ({modality: StageResult}, seconds)."""
    from pipeline.encode import stage

    started = time.perf_counter()
    results = stage.encode_pass(items, batch_size=config.batch_size, actors=config.actors, progress=False)
    return results, time.perf_counter() - started


def max_diff(a, b) -> float:
    """Largest |difference| between two StageResults of one modality after aligning on item id
    (inf when they hold different ids or statuses)."""
    order_a, order_b = np.argsort(a.item_id), np.argsort(b.item_id)
    if a.item_id[order_a].tolist() != b.item_id[order_b].tolist():
        return float("inf")
    if a.status is not None and a.status[order_a].tolist() != b.status[order_b].tolist():
        return float("inf")
    return float(np.abs(a.features[order_a] - b.features[order_b]).max())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench.encode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"first {QUICK_ITEMS} items, one actor per modality")
    parser.add_argument("--items", type=int, help="first N items (default all, or the --quick subset)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--actors", type=int, help="model actors per modality (default: the stage's plan; "
                                                   "--quick: 1)")
    parser.add_argument("--text-model", default="minilm")
    parser.add_argument("--image-model", default="efficientnet-lite0")
    parser.add_argument("--repeats", type=int, default=1, help="run both ways this many times, alternating which "
                                                               "goes first; figures are the medians")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import ray

    from pipeline.encode import stage
    from pipeline.encode.config import EncodeConfig
    from pipeline.encode.encoders import describe

    actors = args.actors if args.actors is not None else (1 if args.quick else None)
    config = EncodeConfig(text_model=args.text_model, image_model=args.image_model, batch_size=args.batch_size,
                          actors=actors)
    table = load_items(args.data, args.items or (QUICK_ITEMS if args.quick else None))
    items = works(table, config, describe(config.image_spec)["size"])
    n_images, n_texts = len(items[0].item_id), len(items[1].item_id)
    load_before = loadavg_1min()
    niceness = os.nice(0)
    started = time.perf_counter()
    stage.ensure_ray()
    ray_init_s = time.perf_counter() - started
    print(f"{len(table)} items ({n_images} posters, {n_texts} texts), batch {config.batch_size}, "
          f"{os.cpu_count()} CPUs, nice {niceness}, load average {load_before:.1f} before (the machine is shared: "
          f"other jobs' load shows in every timing); Ray started in {ray_init_s:.1f} s")

    seconds = {"two_passes": [], "one_pass": []}
    stage_seconds = {"two_passes": [], "one_pass": []}
    loads = {"two_passes": [], "one_pass": []}
    results = {}
    ways = {"two_passes": two_passes, "one_pass": one_pass}
    try:
        for repeat in range(args.repeats):
            order = ["two_passes", "one_pass"] if repeat % 2 == 0 else ["one_pass", "two_passes"]
            for name in order:
                load = loadavg_1min()
                results[name], took = ways[name](items, config)
                loads[name].append([round(load, 1), round(loadavg_1min(), 1)])
                seconds[name].append(took)
                stage_seconds[name].append({m: round(r.seconds, 2) for m, r in results[name].items()})
                parts = ", ".join(f"{m} {s:.1f} s" for m, s in stage_seconds[name][-1].items())
                print(f"  [{repeat + 1}/{args.repeats}] {name.replace('_', ' '):10s} {took:7.1f} s "
                      f"({(n_images + n_texts) / took:5.2f} rows/s; {parts}"
                      + (", each from the pass's start" if name == "one_pass" else "")
                      + f"; load average {loads[name][-1][0]:.1f} -> {loads[name][-1][1]:.1f})", flush=True)
        plans = {name: {m: r.plan.as_dict() for m, r in results[name].items()} for name in results}
        resources = ray.cluster_resources()
    finally:
        ray.shutdown()

    median = {name: float(np.median(values)) for name, values in seconds.items()}
    ratios = [two / one for two, one in zip(seconds["two_passes"], seconds["one_pass"])]
    ratio = float(np.median(ratios))
    diffs = {m: max_diff(results["two_passes"][m], results["one_pass"][m]) for m in ("image", "text")}
    print(f"two passes  {median['two_passes']:7.1f} s   ({len(table) / median['two_passes']:.2f} items/s)")
    print(f"one pass    {median['one_pass']:7.1f} s   ({len(table) / median['one_pass']:.2f} items/s)")
    print(f"ratio two passes / one pass: {ratio:.3f} (>= 1: the one pass is at least as fast as the sum of the "
          f"two; per repeat: {', '.join(f'{r:.3f}' for r in ratios)}); max |diff| image {diffs['image']:.2e}, "
          f"text {diffs['text']:.2e}"
          + ("  [quick: start-up dominates; the full run gives the ratio]" if args.quick else ""))
    emit_json({
        "bench": "encode", "dataset": "movielens-100k-mm", "items": len(table), "images": n_images,
        "texts": n_texts, "quick": bool(args.quick), "text_model": config.text_model,
        "image_model": config.image_model, "batch_size": config.batch_size, "actors": actors,
        "seconds": {name: round(value, 2) for name, value in median.items()},
        "items_per_s": {name: round(len(table) / value, 2) for name, value in median.items()},
        "ratio": round(ratio, 3), "ratios": [round(r, 3) for r in ratios],
        "one_pass_at_least_as_fast": ratio >= 1.0, "repeats": args.repeats,
        "runs": {name: [round(s, 2) for s in values] for name, values in seconds.items()}, "load_avg_1min": loads,
        "stage_seconds": stage_seconds, "max_abs_diff": diffs, "plans": plans, "ray_init_s": round(ray_init_s, 2),
        "cluster": {"CPU": resources.get("CPU", 0), "GPU": resources.get("GPU", 0)},
        "machine": {"cpus": os.cpu_count(), "nice": niceness, "python": platform.python_version(),
                    "ray": ray.__version__, "load_avg_1min": [round(load_before, 2), round(loadavg_1min(), 2)]},
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
