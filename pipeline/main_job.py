"""The README's main job on the embedded default, the whole pipeline: a local Ray instance and
the synthetic multimodal dataset. Generate (real PNGs and texts) → encode the catalogue through
the Ray Data stage with the offline encoders → prepare (split + persisted P1 negatives, features
from the store) → train an ID backbone, the backbone + FedMR and + FedMR + GFMFR federatedly on
Ray (--no-fedmr: ID only; --no-gfmfr: without the GFMFR row) → print the comparison beside the
popularity baseline, where the TensorBoard logs and the report are, and one user's top-10 from
the best run by validation.
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
from pipeline.federated.runtime.run import train
from pipeline.report.runs import report_runs
from pipeline.trained import TrainedRun

KS = (10, 20, 50)


def run_main(args) -> int:
    started = time.perf_counter()
    workdir = Path(args.workdir).resolve()
    synthetic = {"seed": args.seed}
    if args.users:
        synthetic["n_users"] = args.users
    if args.items:
        synthetic["n_items"] = args.items
    # the project's default recipe for the backbone (docs/recipes.md), fewer rounds
    overrides = [f"data.synthetic={json.dumps(synthetic)}", f"model.backbone={args.backbone}", "train.preset=default",
                 f"train.rounds={args.rounds}", "train.patience=10", f"train.seed={args.seed}",
                 f"runtime.out={workdir / args.backbone}", f"runtime.progress={str(not args.json).lower()}"]
    config = load_config(None, overrides)
    # FedMR's module at its defaults; FedNCF adds its output to the item embeddings, so it is as wide
    fusion = f"model.fusion={{d_f: {config.model.dim}}}" if args.backbone == "fedncf" else "model.fusion={}"

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
    if args.fedmr:  # the same run with FedMR's Mixing Feature Fusion Module (its defaults, docs/methods.md)
        fedmr = load_config(None, [*overrides, f"data.features={manifest['path']}", fusion,
                                   f"runtime.out={workdir / (args.backbone + '_fedmr')}"])
        summaries[f"{args.backbone} + FedMR"] = train(fedmr, resume=False, data_cache=workdir / "prepared",
                                                      quiet=args.json, fresh=True)
    if args.fedmr and args.gfmfr:  # + FedMR + GFMFR: group-wise fusion and distillation (its defaults, docs/methods.md,
        # with the distillation weight capped at 0.25 as in every config of the default recipe, docs/recipes.md)
        gfmfr = load_config(None, [*overrides, f"data.features={manifest['path']}", fusion,
                                   "model.gfmfr={rho_max: 0.25}", f"runtime.out={workdir / (args.backbone + '_fedmr_gfmfr')}"])
        summaries[f"{args.backbone} + FedMR + GFMFR"] = train(gfmfr, resume=False, data_cache=workdir / "prepared",
                                                              quiet=args.json, fresh=True)
    baseline = evaluate_baselines(data, negatives, names=("popularity",), protocols=("p3",), ks=KS)
    rows = [{"method": "popularity", **row} for row in baseline if row["split"] == "test"]
    for label, run in summaries.items():
        selection = run["selection"]
        rows.append({"method": f"{label} (federated, best round {selection['best_round']})", **selection["test"]})
    run_dirs = [Path(run["run_dir"]) for run in summaries.values()]
    report = report_runs(run_dirs, workdir / "report", title="Main job: the embedded synthetic default")
    metric = config.train.selection()
    best_label, best = max(summaries.items(), key=lambda item: item[1]["selection"]["valid"][metric])
    user = str(data.user_ids[0])
    recommendations = TrainedRun.open(best["run_dir"], data_cache=workdir / "prepared").recommend(user, k=10)
    seconds = time.perf_counter() - started
    if args.json:
        print(json.dumps({"rows": rows, "summary": summary, "summaries": summaries, "features": {k: list(v.shape) for k, v in data.features.items()},
                          "encoder": manifest["modalities"], "report": report["path"], "tensorboard": str(workdir),
                          "recommendations": {"run": best_label, "user": user, "items": [vars(r) for r in recommendations]},
                          "seconds": round(seconds, 2)}, indent=2, default=str))
        return 0
    print("\nP3 (full ranking, training items masked), test split at the best validation round, %:\n")
    print(markdown_table(rows, metric_columns(KS), ["method"]))
    for run in summaries.values():
        print(f"run directory: {run['run_dir']}")
    print(f"TensorBoard logs: tensorboard --logdir {workdir}")
    print(f"report: {report['path']} (plots: {', '.join(Path(f).name for f in report['figures'])})")
    print(f"\ntop 10 for user {user} from {best_label} (best validation {metric}), training items excluded:")
    for r in recommendations:
        print(f"{r.rank:3d}. item {r.item_id:>5s}  {r.score:7.3f}  {r.title}  [{Path(r.image).name if r.image else 'no image'}]")
    print(f"done in {seconds:.1f} s")
    return 0
