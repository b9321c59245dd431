"""Benchmark: one round of local training with FedMR's fusion module on KU (or MovieLens), all users.

    python -m bench.fedmr_round                    # FedRAP+FedMR, all 204 KU users, 5 epochs, 3 rounds
    python -m bench.fedmr_round --backbone fcf --rounds 2 --threads 2
    python -m bench.fedmr_round --quick            # 1 round
    python -m bench.fedmr_round --dataset movielens --quick --threads 2   # all 943 MovieLens users

configs/<dataset>/<backbone>_fedmr.yaml (project defaults: moe, local router, history mixing, dropout
0.1, d_f 64; CLIP ViT-B/32 text and cover features, 512-d) on one Shard holding every user, in
float32, in this process (no Ray). Per round: wall and process-CPU seconds of Shard.train (the
engine's local training of all clients + the reduced upload) and of one P3 validation pass.

GEMM efficiency: every torch.bmm / baddbmm call of the round is wrapped (the per-client layers of the
module are bmm's on the padded client layout, grouped.PaddedLayout; the frozen-feature
projections are bmm's of Gram blocks, client.FeatureSpan) and timed (wall); efficiency = their
FLOPs / their seconds / the torch.mm peak at the same thread count (gemm_peak_gflops, measured
in this process). "Round FLOP rate" divides the same FLOPs by the round's wall seconds. The
ID-only backbone is timed beside it for reference. Process CPU seconds are reported too (a
shared machine stretches wall time); the last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench._common import emit_json, gemm_peak_gflops, machine_line, set_threads, timed


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
    from pipeline.federated.aggregate import apply_uploads, feature_dims, initial_state, round_lrs
    from pipeline.federated.shard import Shard

    cfg = load_config(config_path, list(overrides))
    data, negatives = open_dataset(cfg.data, cache=None)
    init = initial_state(cfg, data.n_users, data.n_items, feature_dims(data))
    shard = Shard(cfg, data, negatives, np.arange(data.n_users), init)
    g, out = dict(init.global_params), []
    for round_ in range(rounds):
        with BmmMeter() as meter, timed() as train:
            upload = shard.train(round_, g, np.arange(data.n_users), round_lrs(cfg, data.n_items, round_))
        g = apply_uploads(g, [upload])
        with timed() as evaluation:
            metrics, _ = shard.evaluate(g, "p3", "valid", (50,))
        row = {"round": round_, "clients": upload.clients, "rows": upload.rows,
               "train_wall_s": train.wall, "train_cpu_s": train.cpu,
               "eval_wall_s": evaluation.wall, "eval_cpu_s": evaluation.cpu, "valid_hr@50": metrics["hr@50"],
               "bmm_calls": meter.calls, "bmm_gflop": meter.flops / 1e9, "bmm_wall_s": meter.wall}
        if meter.wall > 0:
            row["gemm_efficiency"] = meter.flops / meter.wall / 1e9 / peak
            row["round_flop_rate_of_peak"] = meter.flops / train.wall / 1e9 / peak
            row["bmm_share_of_round"] = meter.wall / train.wall
        out.append(row)
        print(f"  round {round_}: train {train.wall:.3f} s wall / {train.cpu:.3f} s CPU, eval {evaluation.cpu:.3f} s CPU"
              + (f", bmm {meter.flops / 1e9:.1f} GFLOP at {100 * row['gemm_efficiency']:.0f}% of peak "
                 f"({100 * row['bmm_share_of_round']:.0f}% of the round)" if meter.wall > 0 else ""), flush=True)
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
