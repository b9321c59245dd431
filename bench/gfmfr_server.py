"""Benchmark: GFMFR's server step per round against the clients' training time, all users.

    python -m bench.gfmfr_server                          # FCF + GFMFR on KU, 4 rounds
    python -m bench.gfmfr_server --dataset movielens --backbone fedrap --rounds 3 --threads 2
    python -m bench.gfmfr_server --fedmr                  # + FedMR + GFMFR (configs/<dataset>/<b>_fedmr_gfmfr.yaml)
    python -m bench.gfmfr_server --quick                  # 2 rounds

configs/<dataset>/<backbone>_gfmfr.yaml (GFMFR's defaults: G = 5, spectral grouping, the
group fusion model trained 50 epochs of SGD at batch 256 on every (group, item) pair), every user
in one in-process pool, float32, no Ray: rounds played by rounds.run_rounds (the product's round
loop) on in_process pools, with no evaluation scheduled in them (train.eval_round0=false and
train.eval_every past the rounds played). Per round, wall and process-CPU seconds of: the
clients' local training (LocalPools.train: round 0 without a teacher, then with the distillation
term), and of the strategy's group step as the loop runs it (GroupServer.step): grouping the
participants (GroupServer.assign: standardise + spectral clustering + Hungarian ids), the pools'
per-group reduction (LocalPools.group_sums) and fitting the group fusion model and the teacher
scores (GroupServer.fit); the server step is the whole group step (time/group_step_seconds).
The baseline, measured in the same process through the same loop: the same model's local
training without GFMFR (the ID backbone, or with --fedmr the backbone + FedMR). Ratios: server
step / GFMFR client training, and GFMFR client training / client training without GFMFR (the
distillation term's cost on the clients). The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse

import numpy as np

from bench._common import CallMeter, emit_json, machine_line, no_evaluation, set_threads


def run(config_path: str, rounds: int, overrides=()) -> list[dict]:
    from pipeline.config import load_config
    from pipeline.data.datasets import open_dataset
    from pipeline.federated.rounds import in_process, run_rounds

    cfg = load_config(config_path, [*no_evaluation(rounds), *overrides])
    data, negatives = open_dataset(cfg.data, cache=None)
    strategy, pools = in_process(cfg, data, negatives)
    meter = CallMeter()
    meter.wrap(pools, "train")
    if strategy.groups is not None:
        for name in ("assign", "fit"):  # the group step's parts, timed where the step calls them
            meter.wrap(strategy.groups, name)
        meter.wrap(pools, "group_sums")
    out = []

    def measured(metrics: dict) -> None:
        spans = meter.take()
        train = spans["train"]
        row = {"round": metrics["round"], "clients": metrics["train/clients"],
               "distilled": int(metrics.get("group/distilled_clients", 0)),
               "train_wall_s": train.wall, "train_cpu_s": train.cpu,
               "train_aggregate_wall_s": metrics["time/train_seconds"]}
        if strategy.groups is not None:
            grouping, reduce, fit = spans["assign"], spans["group_sums"], spans["fit"]
            row.update({"grouping_wall_s": grouping.wall, "grouping_cpu_s": grouping.cpu,
                        "reduce_wall_s": reduce.wall, "fit_wall_s": fit.wall, "fit_cpu_s": fit.cpu,
                        "fusion_wall_s": metrics["time/group_fusion_seconds"],
                        "teacher_wall_s": metrics["time/teacher_seconds"],
                        "server_wall_s": metrics["time/group_step_seconds"],
                        "groups_nonempty": metrics["group/nonempty"], "fusion_loss": metrics["group/fusion_loss"]})
            print(f"  round {row['round']}: clients {train.wall:.2f} s ({row['distilled']} distilled) | server "
                  f"{row['server_wall_s']:.2f} s: grouping {grouping.wall:.2f}, reduce {reduce.wall:.3f}, "
                  f"group fusion {row['fusion_wall_s']:.2f}, teacher {row['teacher_wall_s']:.3f}", flush=True)
        else:
            print(f"  round {row['round']}: clients {train.wall:.2f} s", flush=True)
        out.append(row)

    run_rounds(strategy, pools, rounds=rounds, on_round=measured)
    return out


def mean(rows: list[dict], key: str) -> float:
    return float(np.mean([r[key] for r in rows]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="fcf", choices=["fedavg", "fcf", "fedncf", "pfedrec", "fedrap"])
    parser.add_argument("--dataset", default="ku", choices=["ku", "movielens"],
                        help="configs/<dataset>/<backbone>[_fedmr]_gfmfr.yaml (movielens reads "
                             "runs/features/movielens-100k-mm)")
    parser.add_argument("--fedmr", action="store_true", help="FedMR + GFMFR")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="2 rounds")
    args = parser.parse_args(argv)
    rounds = 2 if args.quick else max(2, args.rounds)
    threads = set_threads(args.threads)
    print(machine_line(threads))
    stem = f"configs/{args.dataset}/{args.backbone}{'_fedmr' if args.fedmr else ''}"
    print(f"{stem}_gfmfr.yaml:")
    with_groups = run(f"{stem}_gfmfr.yaml", rounds)
    print(f"baseline, the same without GFMFR ({stem}.yaml):")
    plain = run(f"{stem}.yaml", rounds)
    distilling = with_groups[1:]  # round 0 has no teacher yet
    figures = {
        "benchmark": "gfmfr_server", "dataset": args.dataset, "backbone": args.backbone, "fedmr": args.fedmr,
        "threads": threads, "rounds": rounds,
        "clients_train_wall_s": mean(distilling, "train_wall_s"),
        "no_gfmfr_clients_train_wall_s": mean(plain[1:], "train_wall_s"),
        "server_step_wall_s": mean(with_groups, "server_wall_s"),
        "grouping_wall_s": mean(with_groups, "grouping_wall_s"),
        "reduce_wall_s": mean(with_groups, "reduce_wall_s"),
        "group_fusion_wall_s": mean(with_groups, "fusion_wall_s"),
        "teacher_wall_s": mean(with_groups, "teacher_wall_s"),
    }
    figures["server_over_clients"] = figures["server_step_wall_s"] / figures["clients_train_wall_s"]
    figures["distillation_client_overhead"] = figures["clients_train_wall_s"] / figures["no_gfmfr_clients_train_wall_s"]
    print(f"server step {figures['server_step_wall_s']:.2f} s per round = {figures['server_over_clients']:.2f}x the "
          f"clients' training ({figures['clients_train_wall_s']:.2f} s); distillation makes client training "
          f"{figures['distillation_client_overhead']:.2f}x the time without GFMFR")
    figures = {**figures, "gfmfr_rounds": with_groups, "baseline_rounds": plain}
    emit_json(figures)
    return figures


if __name__ == "__main__":
    main()
