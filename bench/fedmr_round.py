"""Benchmark: one round of local training with FedMR's fusion module on KU (or MovieLens), all users.

    python -m bench.fedmr_round                    # FedRAP+FedMR, all 204 KU users, 5 epochs, 3 rounds
    python -m bench.fedmr_round --backbone fcf --rounds 2 --threads 2
    python -m bench.fedmr_round --quick            # 1 round
    python -m bench.fedmr_round --dataset movielens --quick --threads 2   # all 943 MovieLens users

configs/<dataset>/<backbone>_fedmr.yaml (project defaults: moe, local router, history mixing, dropout
0.1, d_f 64; CLIP ViT-B/32 text and cover features, 512-d), every user in one in-process pool,
float32, no Ray: rounds played by rounds.run_rounds (the product's round loop) on in_process
pools, each round as the config schedules it (aggregation, FedMR's server step, the scheduled
evaluation on valid and test). Per round: wall and process-CPU seconds of the pools' training
(LocalPools.train: every client's local training + the reduced upload), the round's train phase
as the loop reports it (time/train_seconds: training + aggregation), and the scheduled
evaluation (LocalPools.evaluate, valid and test under the config's protocol, P3).

GEMM efficiency: every torch.bmm / baddbmm call of the pools' training is wrapped (the per-client layers of the
module are bmm's on the padded client layout, grouped.PaddedLayout; the frozen-feature
projections are bmm's of Gram blocks, client.FeatureSpan) and timed (wall); efficiency = their
FLOPs / their seconds / the torch.mm peak at the same thread count (gemm_peak_gflops, measured
in this process). "Round FLOP rate" divides the same FLOPs by the training's wall seconds. The
ID-only backbone is timed beside it for reference. Process CPU seconds are reported too (a
shared machine stretches wall time); the last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench._common import CallMeter, Span, emit_json, gemm_peak_gflops, machine_line, set_threads


class BmmMeter:
    """Counts the FLOPs (2 b n k m) and wall seconds of every torch.bmm and torch.baddbmm
    while installed."""

    def __init__(self):
        self.flops = self.wall = 0.0
        self.calls = 0
        self._bmm, self._baddbmm = torch.bmm, torch.baddbmm

    def _timed(self, function, a, b, *args, **kwargs):
        started = time.perf_counter()
        out = function(*args, a, b, **kwargs)
        self.wall += time.perf_counter() - started
        self.flops += 2.0 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
        self.calls += 1
        return out

    def __enter__(self):
        torch.bmm = lambda a, b, **kwargs: self._timed(self._bmm, a, b, **kwargs)
        torch.baddbmm = lambda input, a, b, **kwargs: self._timed(self._baddbmm, a, b, input, **kwargs)
        return self

    def __exit__(self, *exc):
        torch.bmm, torch.baddbmm = self._bmm, self._baddbmm


def run(config_path: str, rounds: int, peak: float, overrides=()) -> list[dict]:
    from pipeline.config import load_config
    from pipeline.data.datasets import open_dataset
    from pipeline.federated.rounds import in_process, run_rounds

    cfg = load_config(config_path, list(overrides))
    data, negatives = open_dataset(cfg.data, cache=None)
    strategy, pools = in_process(cfg, data, negatives)
    meter, bmm = CallMeter(), BmmMeter()
    meter.wrap(pools, "train", around=bmm)  # the GEMMs of local training only, not of evaluation
    meter.wrap(pools, "evaluate")
    out = []

    def measured(metrics: dict) -> None:
        spans = meter.take()
        train, evaluation = spans["train"], spans.get("evaluate", Span())
        row = {"round": metrics["round"], "clients": metrics["train/clients"], "rows": metrics["train/rows"],
               "train_wall_s": train.wall, "train_cpu_s": train.cpu,
               "train_aggregate_wall_s": metrics["time/train_seconds"], "round_wall_s": metrics["time/round_seconds"],
               "eval_wall_s": evaluation.wall, "eval_cpu_s": evaluation.cpu, "valid_hr@50": metrics.get("valid/hr@50"),
               "bmm_calls": bmm.calls, "bmm_gflop": bmm.flops / 1e9, "bmm_wall_s": bmm.wall}
        if bmm.wall > 0:
            row["gemm_efficiency"] = bmm.flops / bmm.wall / 1e9 / peak
            row["round_flop_rate_of_peak"] = bmm.flops / train.wall / 1e9 / peak
            row["bmm_share_of_round"] = bmm.wall / train.wall
        bmm.flops = bmm.wall = bmm.calls = 0
        out.append(row)
        print(f"  round {row['round']}: train {train.wall:.3f} s wall / {train.cpu:.3f} s CPU (with aggregation "
              f"{row['train_aggregate_wall_s']:.3f} s), eval {evaluation.cpu:.3f} s CPU"
              + (f", bmm {row['bmm_gflop']:.1f} GFLOP at {100 * row['gemm_efficiency']:.0f}% of peak "
                 f"({100 * row['bmm_share_of_round']:.0f}% of the training)" if "gemm_efficiency" in row else ""),
              flush=True)

    run_rounds(strategy, pools, rounds=rounds, on_round=measured)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="fedrap", choices=["fedavg", "fcf", "fedncf", "pfedrec", "fedrap"])
    parser.add_argument("--dataset", default="ku", choices=["ku", "movielens"],
                        help="configs/<dataset>/<backbone>[_fedmr].yaml (movielens reads runs/features/movielens-100k-mm)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="one round")
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    threads = set_threads(args.threads)
    print(machine_line(threads))
    peak = gemm_peak_gflops()["gflops"]
    print(f"torch.mm peak: {peak:.1f} GFLOP/s")
    print(f"{args.backbone} + FedMR (configs/{args.dataset}/{args.backbone}_fedmr.yaml):")
    fused = run(f"configs/{args.dataset}/{args.backbone}_fedmr.yaml", rounds, peak)
    print(f"{args.backbone} ID only (configs/{args.dataset}/{args.backbone}.yaml):")
    plain = run(f"configs/{args.dataset}/{args.backbone}.yaml", rounds, peak)
    steady = fused[1:] or fused  # round 0 pays one-off allocations
    figures = {
        "benchmark": "fedmr_round", "dataset": args.dataset, "backbone": args.backbone, "threads": threads,
        "rounds": rounds, "gemm_peak_gflops": peak,
        "fedmr_train_cpu_s_per_round": float(np.mean([r["train_cpu_s"] for r in steady])),
        "fedmr_train_wall_s_per_round": float(np.mean([r["train_wall_s"] for r in steady])),
        "fedmr_eval_cpu_s": float(np.mean([r["eval_cpu_s"] for r in steady])),
        "fedmr_gemm_efficiency": float(np.mean([r["gemm_efficiency"] for r in steady])),
        "fedmr_round_flop_rate_of_peak": float(np.mean([r["round_flop_rate_of_peak"] for r in steady])),
        "id_only_train_cpu_s_per_round": float(np.mean([r["train_cpu_s"] for r in (plain[1:] or plain)])),
        "fedmr_rounds": fused, "id_only_rounds": plain,
    }
    emit_json(figures)


if __name__ == "__main__":
    main()
