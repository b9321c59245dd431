"""The README's main job on the embedded default: a local Ray instance and the synthetic
multimodal dataset. Today: generate → prepare (split + persisted P1 negatives) → evaluate the
popularity baseline under P3 and P1 on Ray → print the tables. Later stages (encode, train)
plug in between prepare and the table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

from pipeline.data.datasets import DatasetConfig, open_dataset
from pipeline.eval.tables import markdown_table, metric_columns

KS = (10, 20, 50)


def _evaluate_on_ray(prepared_dir: str) -> list[dict]:
    """Runs inside a Ray task: reads the persisted split, evaluates the popularity baseline."""
    from pipeline.data.store import load_prepared
    from pipeline.eval.baselines import evaluate_baselines

    data, negatives = load_prepared(Path(prepared_dir))
    return evaluate_baselines(data, negatives, names=("popularity",), protocols=("p3", "p1"), ks=KS)


def run_main(args) -> int:
    import ray

    started = time.perf_counter()
    workdir = Path(args.workdir).resolve()
    synthetic = {"seed": args.seed}
    if args.users:
        synthetic["n_users"] = args.users
    if args.items:
        synthetic["n_items"] = args.items
    config = DatasetConfig(name="synthetic", synthetic=synthetic)
    steps = tqdm(total=3, desc="main job", unit="step", disable=args.json)

    steps.set_postfix_str("generate + prepare")
    data, negatives = open_dataset(config, cache=workdir / "prepared")
    prepared_dir = next((workdir / "prepared").glob(f"synthetic-*/meta.json")).parent
    steps.update()

    steps.set_postfix_str("start local Ray")
    ray.init(num_cpus=None, include_dashboard=False, log_to_driver=False,
             ignore_reinit_error=True, configure_logging=False)
    steps.update()
    try:
        steps.set_postfix_str("evaluate on Ray")
        rows = ray.get(ray.remote(_evaluate_on_ray).remote(str(prepared_dir)))
        steps.update()
    finally:
        ray.shutdown()
        steps.close()

    seconds = time.perf_counter() - started
    summary = {"dataset": {"users": data.n_users, "items": data.n_items, "train": int(data.train_indptr[-1]),
                           "fingerprint": data.fingerprint(), "prepared": str(prepared_dir)},
               "rows": rows, "seconds": round(seconds, 2)}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"\nsynthetic multimodal dataset: {data.n_users} users, {data.n_items} items, "
          f"{int(data.train_indptr[-1])} training interactions (prepared under {prepared_dir})")
    for protocol, title in (("P3", "P3 (full ranking, training items masked)"),
                            ("P1", "P1 (99 sampled negatives)")):
        print(f"\n{title}, values in %:\n")
        print(markdown_table([r for r in rows if r["protocol"] == protocol], metric_columns(KS),
                             ["method", "split"]))
    print(f"\ndone in {seconds:.1f} s")
    return 0
