"""Benchmark: GFMFR's server step per round against the clients' training time, all users.

    python -m bench.gfmfr_server                          # FCF + GFMFR on KU, 4 rounds
    python -m bench.gfmfr_server --dataset movielens --backbone fedrap --rounds 3 --threads 2
    python -m bench.gfmfr_server --fedmr                  # + FedMR + GFMFR (configs/<dataset>/<b>_fedmr_gfmfr.yaml)
    python -m bench.gfmfr_server --quick                  # 2 rounds

configs/<dataset>/<backbone>_gfmfr.yaml (GFMFR's defaults: G = 5, spectral grouping, the
group fusion model trained 50 epochs of SGD at batch 256 on every (group, item) pair) on one
Shard holding every user, in this process (no Ray), float32. Per round, wall and process-CPU
seconds of: the clients' local training (Shard.train: round 0 without a teacher, then with the
distillation term), grouping the participants (GroupServer.assign: standardise + spectral
clustering + Hungarian ids), the pools' per-group reduction (Shard.group_sums), and fitting the
group fusion model and the teacher scores (GroupServer.fit). The baseline, measured in the
same process: the same model's local training without GFMFR (the ID backbone, or with --fedmr
the backbone + FedMR). Ratios: server step / GFMFR client training, and GFMFR client training /
client training without GFMFR (the distillation term's cost on the clients). The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from bench._common import emit_json, machine_line, set_threads, timed


def run(config_path: str, rounds: int, overrides=()) -> list[dict]:
    from pipeline.config import load_config
    from pipeline.data.datasets import open_dataset
    from pipeline.federated.aggregate import apply_uploads, feature_dims, initial_state, round_lrs
    from pipeline.federated.group_server import GroupServer
    from pipeline.federated.shard import Shard
    from pipeline.models import model_for

    cfg = load_config(config_path, list(overrides))
    data, negatives = open_dataset(cfg.data, cache=None)
    init = initial_state(cfg, data.n_users, data.n_items, feature_dims(data))
    model = model_for(cfg.model)
    users = np.arange(data.n_users)
    shard = Shard(cfg, data, negatives, users, init)
    groups = None
    if cfg.model.gfmfr is not None:
        groups = GroupServer(cfg, model, init, {m: torch.as_tensor(np.asarray(x)) for m, x in data.features.items()},
                             data.n_users, data.n_items)
    g, out = dict(init.global_params), []
    for round_ in range(rounds):
        teacher = groups.download(round_) if groups is not None else None
        with timed() as train:
            upload = shard.train(round_, g, users, round_lrs(cfg, data.n_items, round_), teacher)
        downloaded, g = g, apply_uploads(g, [upload])
        row = {"round": round_, "clients": upload.clients, "distilled": upload.distilled,
               "train_wall_s": train.wall, "train_cpu_s": train.cpu}
        if groups is not None:
            with timed() as grouping:
                ids = groups.assign(round_, upload.group_users, upload.group_vectors)
            with timed() as reduce:
                sums, members = shard.group_sums(ids, cfg.model.gfmfr.group_num)
            with timed() as fit:
                metrics = groups.fit(round_, upload.group_users, ids, sums, members, downloaded[model.GROUP_TABLE],
                                     upload.group_vectors, upload.group_alpha, g)
            row.update({"grouping_wall_s": grouping.wall, "grouping_cpu_s": grouping.cpu,
                        "reduce_wall_s": reduce.wall, "fit_wall_s": fit.wall, "fit_cpu_s": fit.cpu,
                        "fusion_wall_s": metrics["time/group_fusion_seconds"],
                        "teacher_wall_s": metrics["time/teacher_seconds"],
                        "server_wall_s": grouping.wall + reduce.wall + fit.wall,
                        "groups_nonempty": metrics["group/nonempty"], "fusion_loss": metrics["group/fusion_loss"]})
            print(f"  round {round_}: clients {train.wall:.2f} s ({upload.distilled} distilled) | server "
                  f"{row['server_wall_s']:.2f} s: grouping {grouping.wall:.2f}, reduce {reduce.wall:.3f}, "
                  f"group fusion {row['fusion_wall_s']:.2f}, teacher {row['teacher_wall_s']:.3f}", flush=True)
        else:
            print(f"  round {round_}: clients {train.wall:.2f} s", flush=True)
        out.append(row)
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
