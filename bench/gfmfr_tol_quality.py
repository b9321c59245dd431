"""Benchmark: what model.gfmfr.server_tol (early stop of the group fusion model) costs in quality.

    python -m bench.gfmfr_tol_quality --config configs/movielens/fcf_gfmfr.yaml --rounds 10 --tol none 1e-3
    python -m bench.gfmfr_tol_quality --config configs/movielens/fedrap_gfmfr.yaml --tol none 1e-3 \
        --regroup-every 1 4 --seeds 0 1     # also model.gfmfr.regroup_every, and train.seed / model_seed
    python -m bench.gfmfr_tol_quality --config configs/movielens/fedrap_gfmfr.yaml --tol none \
        --set model.gfmfr.server_target_scale=rms     # any config override, for every run

For each seed, each tol (none = the default, every one of server_epochs) and each
regroup_every (--regroup-every; 1 = the default, cluster every round), a short run of the config
(train.rounds=ROUNDS, evaluation after every round, no early stop of the run: train.patience past
the rounds), in process (one in-process pool, float32, no Ray: rounds.run_rounds), printing per
round the validation HR@10 / NDCG@10, the group fusion model's epochs, its last epoch's loss, its
relative error against the group targets (group/fusion_relative_error) and its seconds, and the
grouping's seconds (time/grouping_seconds). --seeds S sets train.seed and train.model_seed to S. A run that
stops on a non-finite loss is reported as such (the rounds it played are kept). The last line
printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse

import numpy as np

from bench._common import emit_json, machine_line, set_threads

KEYS = {"valid/hr@10": "hr10", "valid/ndcg@10": "ndcg10", "group/fusion_epochs": "epochs",
        "group/fusion_loss": "fusion_loss", "group/fusion_relative_error": "fusion_relative_error",
        "time/group_fusion_seconds": "fusion_s", "time/train_seconds": "train_s",
        "time/grouping_seconds": "grouping_s"}


def run(config_path: str, rounds: int, tol: str, regroup_every: int = 1, seed: int | None = None,
        overrides: tuple[str, ...] = ()) -> dict:
    from pipeline.config import load_config
    from pipeline.data.datasets import open_dataset
    from pipeline.federated.rounds import in_process, run_rounds

    cfg = load_config(config_path, [f"train.rounds={rounds}", "train.eval_every=1", "train.eval_round0=true",
                                    f"train.patience={rounds + 1}",
                                    f"model.gfmfr.server_tol={'null' if tol == 'none' else tol}",
                                    f"model.gfmfr.regroup_every={regroup_every}",
                                    *([f"train.seed={seed}", f"train.model_seed={seed}"] if seed is not None else []),
                                    *overrides])
    name = f"tol {tol}, regroup_every {regroup_every}" + (f", seed {seed}" if seed is not None else "")
    data, negatives = open_dataset(cfg.data, cache=None)
    strategy, pools = in_process(cfg, data, negatives)
    rows = []

    def on_round(metrics: dict) -> None:
        row = {"round": metrics["round"], **{short: metrics.get(key) for key, short in KEYS.items()}}
        rows.append(row)
        print(f"  {name}, round {row['round']}: valid HR@10 {100 * row['hr10']:.2f}, NDCG@10 "
              f"{100 * row['ndcg10']:.2f} | group fusion {row['epochs']} epochs, loss {row['fusion_loss']:.4g}, "
              f"relative error {row['fusion_relative_error']:.3f}, {row['fusion_s']:.2f} s; grouping "
              f"{row['grouping_s']:.3f} s", flush=True)

    stopped = None
    try:
        run_rounds(strategy, pools, rounds=rounds, on_round=on_round)
    except FloatingPointError as error:  # a diverging run stops, as the product stops it
        stopped = str(error)
        print(f"  {name}: stopped: {stopped}", flush=True)
    hr = [r["hr10"] for r in rows]
    summary = {"tol": tol, "regroup_every": regroup_every, "seed": seed, "rounds_played": len(rows), "stopped": stopped,
               "mean_hr10": float(np.mean(hr)) if hr else None, "best_hr10": max(hr) if hr else None,
               "last_hr10": hr[-1] if hr else None,
               "mean_epochs_after_round0": float(np.mean([r["epochs"] for r in rows[1:]])) if len(rows) > 1 else None,
               "rounds": rows}
    if hr:
        print(f"  {name}: {len(rows)} rounds, valid HR@10 mean {100 * summary['mean_hr10']:.2f}, best "
              f"{100 * summary['best_hr10']:.2f}, last {100 * summary['last_hr10']:.2f}"
              + (f"; {summary['mean_epochs_after_round0']:.1f} epochs per round after round 0"
                 if summary["mean_epochs_after_round0"] is not None else ""), flush=True)
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/movielens/fcf_gfmfr.yaml")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--tol", nargs="+", default=["none", "1e-3"], help="server_tol values; none = off")
    parser.add_argument("--regroup-every", type=int, nargs="+", default=[1],
                        help="model.gfmfr.regroup_every values; 1 = the default")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="train.seed = train.model_seed values (default: the config's)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides for every run (e.g. model.gfmfr.server_target_scale=rms)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    print(machine_line(threads))
    print(f"{args.config}, {args.rounds} rounds:")
    runs = [run(args.config, args.rounds, tol, every, seed, tuple(args.set)) for seed in (args.seeds or [None])
            for tol in args.tol for every in args.regroup_every]
    figures = {"benchmark": "gfmfr_tol_quality", "config": args.config, "set": args.set, "rounds": args.rounds,
               "threads": threads,
               "runs": runs}
    emit_json(figures)
    return figures


if __name__ == "__main__":
    main()
