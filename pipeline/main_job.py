"""The README's main job on the embedded default: a local Ray instance and the synthetic
multimodal dataset. Today: generate (real PNGs and texts) → encode the catalogue through the
Ray Data stage with the offline encoders → prepare (split + persisted P1 negatives, features
from the store) → train an ID backbone federatedly on Ray → print it beside the popularity
baseline and the same backbone with FedMR's fusion module on the encoded features (--no-fedmr:
ID only) and, with --gfmfr, with GFMFR's group-wise fusion and distillation.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.config import load_config
from pipeline.data.datasets import materialize_synthetic, open_dataset
from pipeline.encode.job import encode_items
from pipeline.eval.baselines import evaluate_baselines
from pipeline.eval.tables import markdown_table, metric_columns
from pipeline.federated.run import train

KS = (10, 20, 50)


def run_main(args) -> int:
    started = time.perf_counter()
    workdir = Path(args.workdir).resolve()
    synthetic = {"seed": args.seed}
    if args.users:
        synthetic["n_users"] = args.users
    if args.items:
        synthetic["n_items"] = args.items
    overrides = [f"data.synthetic={json.dumps(synthetic)}", f"model.backbone={args.backbone}",
                 f"train.rounds={args.rounds}", "train.patience=10", f"train.seed={args.seed}",
                 f"runtime.out={workdir / args.backbone}", f"runtime.progress={str(not args.json).lower()}"]
    config = load_config(None, overrides)

    folder = materialize_synthetic(config.data, workdir / "prepared")
    if not args.json:
        print(f"encoding {folder / 'catalogue.csv'} (images and texts) with the offline encoders on Ray Data")
    manifest = encode_items(folder, workdir / "features", progress=not args.json)
    config = load_config(None, [*overrides, f"data.features={manifest['path']}"])
    data, negatives = open_dataset(config.data, cache=workdir / "prepared")
    if not args.json:
        shapes = ", ".join(f"{name} {list(matrix.shape)}" for name, matrix in data.features.items())
        print(f"synthetic multimodal dataset: {data.n_users} users, {data.n_items} items, "
              f"{int(data.train_indptr[-1])} training interactions; features {shapes}")
    summary = train(config, resume=False, data_cache=workdir / "prepared", quiet=args.json, fresh=True)
    summaries = {args.backbone: summary}
    if args.fedmr:  # the same run with FedMR's Mixing Feature Fusion Module (defaults of spec/fedmr.md)
        fedmr = load_config(None, [*overrides, f"data.features={manifest['path']}", "model.fusion={}",
                                   f"runtime.out={workdir / (args.backbone + '_fedmr')}"])
        summaries[f"{args.backbone} + FedMR"] = train(fedmr, resume=False, data_cache=workdir / "prepared",
                                                      quiet=args.json, fresh=True)
    if getattr(args, "gfmfr", False):  # GFMFR's group-wise fusion and distillation (spec/gfmfr.md defaults)
        gfmfr = load_config(None, [*overrides, f"data.features={manifest['path']}", "model.gfmfr={}",
                                   f"runtime.out={workdir / (args.backbone + '_gfmfr')}"])
        summaries[f"{args.backbone} + GFMFR"] = train(gfmfr, resume=False, data_cache=workdir / "prepared",
                                                      quiet=args.json, fresh=True)
    baseline = evaluate_baselines(data, negatives, names=("popularity",), protocols=("p3",), ks=KS)
    rows = [{"method": "popularity", **row} for row in baseline if row["split"] == "test"]
    for label, run in summaries.items():
        selection = run["selection"]
        rows.append({"method": f"{label} (federated, best round {selection['best_round']})", **selection["test"]})
    seconds = time.perf_counter() - started
    if args.json:
        print(json.dumps({"rows": rows, "summary": summary, "summaries": summaries, "features": {k: list(v.shape) for k, v in data.features.items()},
                          "encoder": manifest["modalities"],
                          "seconds": round(seconds, 2)}, indent=2, default=str))
        return 0
    print("\nP3 (full ranking, training items masked), test split at the best validation round, %:\n")
    print(markdown_table(rows, metric_columns(KS), ["method"]))
    for run in summaries.values():
        print(f"run directory: {run['run_dir']}  (tensorboard --logdir {run['run_dir']}/tb)")
    print(f"done in {seconds:.1f} s")
    return 0
