"""Benchmark: GFMFR's server step per round against the clients' training time, all users.

    python -m bench.gfmfr_server                          # FCF + GFMFR on KU, 4 rounds
    python -m bench.gfmfr_server --dataset movielens --backbone fedrap --rounds 3 --tol 1e-3
    python -m bench.gfmfr_server --dataset movielens --backbone fedrap --rounds 2 --tol 1e-3 --regroup-every 4
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

Each round the group fusion model's training (GroupServer.train) also runs, from the same
starting model on a copy, with the reference implementation
(reference.group_fusion.train_group_fusion_reference: autograd + torch.optim.SGD, the
implementation before the hand-written one; it computes the same up to float rounding, printed
as the largest parameter difference) and, with --tol, with the early stop
model.gfmfr.server_tol=TOL; the order of the timed trainings alternates between rounds. The
baseline server step is the measured step with the reference training's time in place of the
hand-written one's (everything else in the step is the same code); likewise the --tol figure.
Ratios use the distilling rounds (1 on): mean server step / mean clients' training of those rounds;
wall seconds, and process CPU seconds (less sensitive to other load on a shared machine). torch and
the BLAS/OpenMP pools of numpy, scipy and scikit-learn (the grouping) all run on --threads threads.
A run that stops on a non-finite loss keeps the rounds it played.

With --regroup-every K, each round GroupServer.assign also runs, on the same inputs and the
same previous ids, as under model.gfmfr.regroup_every=K in a round between two groupings
(participants grouped before keep their ids, new ones join the nearest centroid, no clustering),
timed, before or after the real grouping alternately between rounds. The step between groupings
is the measured step with that time in place of the grouping's; over a cycle of K rounds (one
grouping, K - 1 kept) it is (1/K) the measured step + (1 - 1/K) the step between groupings;
with --tol also both options together. The run itself stays on the default (regroup every
round), so every figure comes from the same rounds.

The second baseline, measured in the same process through the same loop: the same model's local
training without GFMFR (the ID backbone, or with --fedmr the backbone + FedMR): the distillation
term's cost on the clients. The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np

from bench._common import CallMeter, emit_json, machine_line, no_evaluation, set_threads


def _compare_trainers(groups, tol: float | None, log: list[dict]) -> None:
    """Replace groups.train (an instance attribute) by: the same training, timed, plus the
    reference trainer (and the early stop at `tol`) on copies of the starting model, timed, in an
    order alternating between rounds; appends one dict per call to `log`."""
    import torch

    from reference.group_fusion import train_group_fusion_reference

    train = groups.train

    def variant(name, start, targets, members, seed, out):
        model, cfg = groups.fusion, groups.cfg
        groups.fusion = copy.deepcopy(start)
        if name == "tol":
            groups.cfg = cfg.model_copy(update={"server_tol": tol})
        try:
            started, cpu = time.perf_counter(), time.process_time()
            losses = train(targets, members, seed,
                           **({"trainer": train_group_fusion_reference} if name == "reference" else {}))
            out[f"{name}_s"], out[f"{name}_cpu_s"] = time.perf_counter() - started, time.process_time() - cpu
            out[f"{name}_epochs"], out[f"{name}_loss"] = len(losses), losses[-1]
            if name == "reference":
                out["reference_params"] = [p.detach().clone() for p in groups.fusion.parameters()]
        finally:
            groups.fusion, groups.cfg = model, cfg

    def measured(targets, members, seed):
        out, names = {}, ["reference", *(["tol"] if tol is not None else [])]
        start = copy.deepcopy(groups.fusion)  # the model every variant starts from
        if len(log) % 2:  # odd calls: the variants after the real training
            started, cpu = time.perf_counter(), time.process_time()
            losses = train(targets, members, seed)
            out["fit_train_s"], out["fit_train_cpu_s"] = time.perf_counter() - started, time.process_time() - cpu
        for name in names:
            variant(name, start, targets, members, seed, out)
        if not len(log) % 2:
            started, cpu = time.perf_counter(), time.process_time()
            losses = train(targets, members, seed)
            out["fit_train_s"], out["fit_train_cpu_s"] = time.perf_counter() - started, time.process_time() - cpu
        out["epochs"], out["loss"] = len(losses), losses[-1]
        with torch.no_grad():
            out["max_param_diff"] = max(float((a - b).abs().max()) for a, b in
                                        zip(groups.fusion.parameters(), out.pop("reference_params")))
        log.append(out)
        return losses

    groups.train = measured


def _compare_assign(groups, every: int, log: list[dict]) -> None:
    """Replace groups.assign (an instance attribute, already timed by the CallMeter) by: the
    same grouping, plus GroupServer.assign under model.gfmfr.regroup_every=EVERY in a round
    between two groupings (round_ = 1 mod EVERY: it keeps the previous ids, new participants
    join the nearest centroid, nothing is clustered), on the same inputs and the same previous
    ids, timed, before or after the real one alternately between rounds; appends one dict per
    call to `log` (how many participants it kept, and how many ids differ from this round's
    clustering)."""
    assign, cls = groups.assign, type(groups)

    def option(round_, users, vectors, out):
        cfg = groups.cfg
        groups.cfg = cfg.model_copy(update={"regroup_every": every})
        try:
            between = round_ - round_ % every + 1  # a round the option does not cluster in
            started, cpu = time.perf_counter(), time.process_time()
            out["ids"] = cls.assign(groups, between, users, vectors)
            out["keep_s"], out["keep_cpu_s"] = time.perf_counter() - started, time.process_time() - cpu
        finally:
            groups.cfg = cfg

    def measured(round_, users, vectors):
        out = {}
        if len(log) % 2:
            option(round_, users, vectors, out)
        ids = assign(round_, users, vectors)
        if not len(log) % 2:
            option(round_, users, vectors, out)
        kept = groups.known[np.asarray(users)] != -1
        out["kept"], out["changed"] = int(kept.sum()), int((out.pop("ids") != ids).sum())
        log.append(out)
        return ids

    groups.assign = measured


def run(config_path: str, rounds: int, overrides=(), tol: float | None = None,
        regroup_every: int | None = None) -> list[dict]:
    from pipeline.config import load_config
    from pipeline.data.datasets import open_dataset
    from pipeline.federated.rounds import in_process, run_rounds

    cfg = load_config(config_path, [*no_evaluation(rounds), *overrides])
    data, negatives = open_dataset(cfg.data, cache=None)
    strategy, pools = in_process(cfg, data, negatives)
    meter = CallMeter()
    meter.wrap(pools, "train")
    trainings: list[dict] = []
    assignments: list[dict] = []
    if strategy.groups is not None:
        for name in ("assign", "fit"):  # the group step's parts, timed where the step calls them
            meter.wrap(strategy.groups, name)
        meter.wrap(pools, "group_sums")
        _compare_trainers(strategy.groups, tol, trainings)
        if regroup_every is not None:
            _compare_assign(strategy.groups, regroup_every, assignments)
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
            trained = trainings[-1]
            extra = sum(trained[f"{k}_s"] for k in ("reference", "tol") if f"{k}_s" in trained)
            extra_cpu = sum(trained[f"{k}_cpu_s"] for k in ("reference", "tol") if f"{k}_cpu_s" in trained)
            kept = assignments[-1] if regroup_every is not None else {"keep_s": 0.0}
            server = metrics["time/group_step_seconds"] - extra - kept["keep_s"]  # the step as the run runs it
            server_cpu = grouping.cpu + reduce.cpu + fit.cpu - extra_cpu
            row.update({"grouping_wall_s": grouping.wall, "grouping_cpu_s": grouping.cpu,
                        "reduce_wall_s": reduce.wall, "fit_wall_s": fit.wall - extra,
                        "fusion_wall_s": metrics["time/group_fusion_seconds"] - extra,
                        "fusion_train_wall_s": trained["fit_train_s"],
                        "teacher_wall_s": metrics["time/teacher_seconds"],
                        "server_wall_s": server,
                        "baseline_server_wall_s": server - trained["fit_train_s"] + trained["reference_s"],
                        "server_cpu_s": server_cpu, "fusion_train_cpu_s": trained["fit_train_cpu_s"],
                        "baseline_server_cpu_s": server_cpu - trained["fit_train_cpu_s"] + trained["reference_cpu_s"],
                        "baseline_fusion_train_wall_s": trained["reference_s"],
                        "fusion_epochs": trained["epochs"], "reference_max_param_diff": trained["max_param_diff"],
                        "reference_fusion_loss": trained["reference_loss"],
                        "groups_nonempty": metrics["group/nonempty"], "fusion_loss": metrics["group/fusion_loss"],
                        "fusion_relative_error": metrics["group/fusion_relative_error"]})
            if tol is not None:
                row.update({"tol_server_wall_s": server - trained["fit_train_s"] + trained["tol_s"],
                            "tol_server_cpu_s": server_cpu - trained["fit_train_cpu_s"] + trained["tol_cpu_s"],
                            "tol_fusion_train_wall_s": trained["tol_s"], "tol_epochs": trained["tol_epochs"],
                            "tol_fusion_loss": trained["tol_loss"]})
            print(f"  round {row['round']}: clients {train.wall:.2f} s ({row['distilled']} distilled) | server "
                  f"{server:.2f} s ({server / train.wall:.2f}x): grouping {grouping.wall:.2f}, reduce "
                  f"{reduce.wall:.3f}, group fusion {row['fusion_wall_s']:.2f} (training "
                  f"{trained['fit_train_s']:.2f}, {trained['epochs']} epochs, loss {trained['loss']:.6g}), teacher "
                  f"{row['teacher_wall_s']:.3f}", flush=True)
            print(f"    baseline (reference training {trained['reference_s']:.2f} s, loss "
                  f"{trained['reference_loss']:.6g}, largest parameter difference {trained['max_param_diff']:.2e}): "
                  f"server {row['baseline_server_wall_s']:.2f} s ({row['baseline_server_wall_s'] / train.wall:.2f}x)",
                  flush=True)
            if tol is not None:
                print(f"    server_tol={tol:g} (training {trained['tol_s']:.2f} s, {trained['tol_epochs']} epochs, "
                      f"loss {trained['tol_loss']:.6g}): server {row['tol_server_wall_s']:.2f} s "
                      f"({row['tol_server_wall_s'] / train.wall:.2f}x)", flush=True)
            if regroup_every is not None:
                # the step in a round between two groupings: the option's assign in place of the grouping;
                # amortised over a cycle of `regroup_every` rounds (one grouping, the others kept)
                share = 1.0 / regroup_every
                kinds = [("regroup", server, server_cpu)]
                if tol is not None:
                    kinds.append(("tol_regroup", row["tol_server_wall_s"], row["tol_server_cpu_s"]))
                row.update({"keep_wall_s": kept["keep_s"], "keep_cpu_s": kept["keep_cpu_s"],
                            "kept_clients": kept["kept"], "keep_changed_ids": kept["changed"]})
                for name, wall, cpu in kinds:
                    between, between_cpu = (wall - grouping.wall + kept["keep_s"],
                                            cpu - grouping.cpu + kept["keep_cpu_s"])
                    row.update({f"{name}_between_wall_s": between, f"{name}_between_cpu_s": between_cpu,
                                f"{name}_server_wall_s": share * wall + (1 - share) * between,
                                f"{name}_server_cpu_s": share * cpu + (1 - share) * between_cpu})
                    label = "regroup_every" if name == "regroup" else f"server_tol={tol:g} + regroup_every"
                    how = (f"kept {kept['kept']} participants' ids in {kept['keep_s']:.4f} s" if kept["kept"] else
                           f"nobody grouped before, so it clusters too: {kept['keep_s']:.2f} s")
                    print(f"    {label}={regroup_every} ({how}, {kept['changed']} ids differ from this round's "
                          f"clustering): "
                          f"server between groupings {between:.2f} s ({between / train.wall:.2f}x; CPU "
                          f"{between_cpu:.2f} s, {between_cpu / train.cpu:.2f}x), over a cycle "
                          f"{row[f'{name}_server_wall_s']:.2f} s ({row[f'{name}_server_wall_s'] / train.wall:.2f}x; "
                          f"CPU {row[f'{name}_server_cpu_s'] / train.cpu:.2f}x)", flush=True)
        else:
            print(f"  round {row['round']}: clients {train.wall:.2f} s", flush=True)
        out.append(row)

    try:
        run_rounds(strategy, pools, rounds=rounds, on_round=measured)
    except FloatingPointError as error:  # a diverging run stops as the product stops it; keep its rounds
        print(f"  stopped after {len(out)} rounds: {error}", flush=True)
        if strategy.groups is None or len(out) < 2:
            raise
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
    parser.add_argument("--tol", type=float, default=None,
                        help="also time the group fusion model's training with model.gfmfr.server_tol=TOL")
    parser.add_argument("--regroup-every", type=int, default=None,
                        help="also time the step under model.gfmfr.regroup_every=K (with --tol: also both)")
    parser.add_argument("--quick", action="store_true", help="2 rounds")
    args = parser.parse_args(argv)
    rounds = 2 if args.quick else max(2, args.rounds)
    threads = set_threads(args.threads)
    print(machine_line(threads))
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads):  # scipy / sklearn (the grouping) as torch
        return _measure(args, rounds, threads)


def _measure(args, rounds: int, threads: int) -> dict:
    stem = f"configs/{args.dataset}/{args.backbone}{'_fedmr' if args.fedmr else ''}"
    print(f"{stem}_gfmfr.yaml:")
    with_groups = run(f"{stem}_gfmfr.yaml", rounds, tol=args.tol, regroup_every=args.regroup_every)
    print(f"baseline, the same without GFMFR ({stem}.yaml):")
    plain = run(f"{stem}.yaml", rounds)
    distilling = with_groups[1:]  # round 0 has no teacher yet
    figures = {
        "benchmark": "gfmfr_server", "dataset": args.dataset, "backbone": args.backbone, "fedmr": args.fedmr,
        "threads": threads, "rounds": rounds, "tol": args.tol, "regroup_every": args.regroup_every,
        "client_train_s": mean(distilling, "train_wall_s"),
        "server_s": mean(distilling, "server_wall_s"),
        "baseline_server_s": mean(distilling, "baseline_server_wall_s"),
        "fusion_train_s": mean(distilling, "fusion_train_wall_s"),
        "baseline_fusion_train_s": mean(distilling, "baseline_fusion_train_wall_s"),
        "client_train_cpu_s": mean(distilling, "train_cpu_s"),
        "server_cpu_s": mean(distilling, "server_cpu_s"),
        "baseline_server_cpu_s": mean(distilling, "baseline_server_cpu_s"),
        "reference_max_param_diff": max(r["reference_max_param_diff"] for r in with_groups),
        "no_gfmfr_clients_train_wall_s": mean(plain[1:], "train_wall_s"),
        "grouping_wall_s": mean(distilling, "grouping_wall_s"),
        "reduce_wall_s": mean(distilling, "reduce_wall_s"),
        "group_fusion_wall_s": mean(distilling, "fusion_wall_s"),
        "teacher_wall_s": mean(distilling, "teacher_wall_s"),
    }
    figures["ratio"] = figures["server_s"] / figures["client_train_s"]
    figures["baseline_ratio"] = figures["baseline_server_s"] / figures["client_train_s"]
    figures["ratio_cpu"] = figures["server_cpu_s"] / figures["client_train_cpu_s"]
    figures["baseline_ratio_cpu"] = figures["baseline_server_cpu_s"] / figures["client_train_cpu_s"]
    figures["fusion_train_speedup"] = figures["baseline_fusion_train_s"] / figures["fusion_train_s"]
    figures["distillation_client_overhead"] = figures["client_train_s"] / figures["no_gfmfr_clients_train_wall_s"]
    print(f"distilling rounds 1-{rounds - 1}: clients' training {figures['client_train_s']:.2f} s per round; server "
          f"step {figures['server_s']:.2f} s = {figures['ratio']:.2f}x (group fusion training "
          f"{figures['fusion_train_s']:.2f} s); baseline, the reference training: {figures['baseline_server_s']:.2f} s "
          f"= {figures['baseline_ratio']:.2f}x (training {figures['baseline_fusion_train_s']:.2f} s, "
          f"{figures['fusion_train_speedup']:.1f}x the hand-written one's; largest parameter difference "
          f"{figures['reference_max_param_diff']:.1e})")
    print(f"process CPU seconds (less sensitive to other load): clients {figures['client_train_cpu_s']:.2f}, server "
          f"{figures['server_cpu_s']:.2f} = {figures['ratio_cpu']:.2f}x, baseline "
          f"{figures['baseline_server_cpu_s']:.2f} = {figures['baseline_ratio_cpu']:.2f}x")
    if args.tol is not None:
        figures["tol_server_s"] = mean(distilling, "tol_server_wall_s")
        figures["tol_ratio"] = figures["tol_server_s"] / figures["client_train_s"]
        figures["tol_epochs"] = mean(distilling, "tol_epochs")
        figures["tol_server_cpu_s"] = mean(distilling, "tol_server_cpu_s")
        figures["tol_ratio_cpu"] = figures["tol_server_cpu_s"] / figures["client_train_cpu_s"]
        print(f"with model.gfmfr.server_tol={args.tol:g}: server step {figures['tol_server_s']:.2f} s = "
              f"{figures['tol_ratio']:.2f}x ({figures['tol_epochs']:.1f} epochs on average; CPU "
              f"{figures['tol_server_cpu_s']:.2f} s = {figures['tol_ratio_cpu']:.2f}x)")
    if args.regroup_every is not None:
        k = args.regroup_every
        for name in ("regroup", *(["tol_regroup"] if args.tol is not None else [])):
            for part in ("between", "server"):
                figures[f"{name}_{part}_s"] = mean(distilling, f"{name}_{part}_wall_s")
                figures[f"{name}_{part}_cpu_s"] = mean(distilling, f"{name}_{part}_cpu_s")
                figures[f"{name}_{part}_ratio"] = figures[f"{name}_{part}_s"] / figures["client_train_s"]
                figures[f"{name}_{part}_ratio_cpu"] = figures[f"{name}_{part}_cpu_s"] / figures["client_train_cpu_s"]
            label = f"regroup_every={k}" + ("" if name == "regroup" else f" + server_tol={args.tol:g}")
            print(f"with model.gfmfr.{label}: server step between groupings {figures[f'{name}_between_s']:.2f} s = "
                  f"{figures[f'{name}_between_ratio']:.2f}x (CPU {figures[f'{name}_between_cpu_s']:.2f} s = "
                  f"{figures[f'{name}_between_ratio_cpu']:.2f}x); over a cycle of {k} rounds (one grouping) "
                  f"{figures[f'{name}_server_s']:.2f} s = {figures[f'{name}_server_ratio']:.2f}x (CPU "
                  f"{figures[f'{name}_server_cpu_s']:.2f} s = {figures[f'{name}_server_ratio_cpu']:.2f}x)")
        figures["keep_wall_s"] = mean(distilling, "keep_wall_s")
    print(f"distillation makes client training {figures['distillation_client_overhead']:.2f}x the time without "
          f"GFMFR")
    figures = {**figures, "gfmfr_rounds": with_groups, "baseline_rounds": plain}
    emit_json(figures)
    return figures


if __name__ == "__main__":
    main()
