"""Scale benchmark: PFedRec on a synthetic population of 1,000,000 users, 10,000 sampled per round.

    python -m bench.scale            # 1M users (10K and 20K per round) and 100K users (10K per round)
    python -m bench.scale --quick    # 100K users, 1K per round (and 10K users / 2K per round to compare)

Rounds are played by rounds.run_rounds (the product's round loop: participants and arrivals,
every pool's training, aggregation) on in-process pools (rounds.in_process: --shards Shard
objects, as ClientPools would hold them, driven one after the other, no Ray), one round per
call so the memory guard below looks between rounds. No evaluation is scheduled in the timed
rounds (train.eval_round0=false, train.eval_every past them); scoring a sample of users is
timed separately. Three settings, all with the same config (PFedRec, P1 preset:
neg_ratio 4, 5 local epochs, pipeline/config.py defaults otherwise):

  main          population P, S sampled per round   (1,000,000 / 10,000)
  small pop     population P/10, S per round         (  100,000 / 10,000): same S, 10x fewer users
  double S      population P, 2S per round           (1,000,000 / 20,000): same P, twice the users

Seconds per round = mean over --rounds rounds after --warmup round(s). The settings are compared
at the same round indices (a setting that stopped early is compared on the rounds it ran), wall
and CPU seconds: if round time depends on the sampled users only, small pop / main ~ 1 and
double S / main ~ 2. Peak RSS: of the
whole process (getrusage, includes data generation) and of each phase (/proc VmHWM reset per
phase, Linux); pass/fail against --rss-limit-gb (8). Generation and preparation are timed
separately. The private state kept per shard (PersonalStore) is sized after every round, so a
growth with the number of users trained so far shows up as such. To protect a shared machine,
a setting stops early when the next round's projected peak RSS exceeds --abort-gb (reported).

--ray additionally plays the main setting's rounds through real Ray ClientPool actors (the same
run_rounds on pool.RayPools, as the job's Server does; no evaluation scheduled). The last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from bench._common import (GB, MB, current_rss_bytes, device_line, emit_json, machine_line, mem_available_bytes,
                           no_evaluation, phase_peak_rss_bytes, process_peak_rss_bytes, release_memory,
                           reset_phase_peak, set_threads, timed)

BACKBONE = "pfedrec"


def make_config(participation: float, overrides=()):
    from pipeline.config import load_config

    return load_config(None, [f"model.backbone={BACKBONE}", "train.protocol=p1", "train.neg_ratio=4",
                              f"train.participation={participation}", *overrides])


def make_dataset(n_users: int, n_items: int, seed: int) -> tuple[object, dict]:
    """generate() + prepare(); returns the PreparedDataset and the timings/sizes."""
    from pipeline.data.prepare import PrepareConfig, prepare
    from pipeline.data.synthetic import SyntheticConfig, generate

    release_memory()
    reset_phase_peak()
    with timed() as gen:
        raw = generate(SyntheticConfig(n_users=n_users, n_items=n_items, images=False, seed=seed),
                       progress=False).dataset
    n_raw = len(raw.interactions)
    with timed() as prep:
        data = prepare(raw, PrepareConfig())
    del raw
    data.catalogue = None  # item text is not used by an ID backbone
    release_memory()
    info = {"n_users": data.n_users, "n_items": data.n_items, "raw_interactions": n_raw,
            "train_positives": int(data.train_counts.sum()), "generate_s": gen.wall, "generate_cpu_s": gen.cpu,
            "prepare_s": prep.wall, "prepare_cpu_s": prep.cpu, "phase_peak_rss_gb": phase_peak_rss_bytes() / GB,
            "rss_after_gb": current_rss_bytes() / GB}
    print(f"data: synthetic {n_users:,} users x {n_items:,} items -> {n_raw:,} interactions; generate "
          f"{gen.wall:.1f} s wall ({gen.cpu:.1f} s CPU), prepare {prep.wall:.1f} s wall ({prep.cpu:.1f} s CPU) -> "
          f"{data.n_users:,} users, {data.n_items:,} items, {info['train_positives']:,} training positives "
          f"(per user {data.train_counts.min()}..{data.train_counts.max()}); phase peak RSS "
          f"{info['phase_peak_rss_gb']:.2f} GB, RSS now {info['rss_after_gb']:.2f} GB", flush=True)
    return data, info


def tensor_bytes(obj) -> int:
    """Bytes of every torch tensor / numpy array inside nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def store_report(shards) -> dict:
    """Bytes of the shards' private state (PersonalStore.state_dict), by part."""
    out: dict[str, int] = {}
    for shard in shards:
        for part, value in shard.store.state_dict().items():
            out[part] = out.get(part, 0) + tensor_bytes(value)
    return out


def run_setting(label: str, data, per_round: int, args, abort_bytes: int) -> dict:
    """Rounds of the product's round loop (rounds.run_rounds) on in-process pools of `data`,
    `per_round` sampled users each, no evaluation scheduled in them."""
    from pipeline.federated.rounds import in_process, run_rounds

    participation = per_round / data.n_users
    total = args.warmup + args.rounds
    cfg = make_config(participation, no_evaluation(total + 1))  # + 1: the --profile round
    release_memory()
    base_rss = current_rss_bytes()
    reset_phase_peak()
    print(f"\n== {label}: population {data.n_users:,}, participation {participation:g} "
          f"({per_round:,} per round), {args.shards} in-process pool(s), RSS at start {base_rss / GB:.2f} GB",
          flush=True)
    with timed() as setup:
        strategy, pools = in_process(cfg, data, n_pools=args.shards, device=args.device)
        shards = pools.pools
    setup_peak = phase_peak_rss_bytes()
    print(f"setup: initial model + {len(shards)} pool(s) {setup.wall:.2f} s, phase peak RSS {setup_peak / GB:.2f} GB")

    rounds, stopped = [], None
    for r in range(total):  # one run_rounds round at a time: the memory guard looks between rounds
        peaks = [e["peak_rss_bytes"] for e in rounds]
        if peaks:
            growth = peaks[-1] - (peaks[-2] if len(peaks) >= 2 else base_rss)
            projected = peaks[-1] + max(0, growth)
            available = mem_available_bytes()
            limit = abort_bytes if available is None else min(abort_bytes, current_rss_bytes() + int(0.85 * available))
            if projected > limit:
                stopped = (f"stopped before round {r}: projected peak RSS {projected / GB:.1f} GB (last "
                           f"{peaks[-1] / GB:.1f} GB, growth {growth / GB:+.1f} GB/round) > abort limit "
                           f"{limit / GB:.1f} GB (machine protection)")
                print(stopped, flush=True)
                break
        reset_phase_peak()
        with timed() as span:
            [metrics] = run_rounds(strategy, pools, rounds=1)
        store = store_report(shards)
        entry = {"round": r, "warmup": r < args.warmup, "clients": int(metrics["train/clients"]),
                 "rows": int(metrics["train/rows"]), "seconds": span.wall, "cpu_seconds": span.cpu,
                 "pool_seconds_max": metrics["time/pool_seconds_max"], "peak_rss_bytes": phase_peak_rss_bytes(),
                 "rss_after_bytes": current_rss_bytes(), "store_bytes": sum(store.values()), "store_parts": store}
        rounds.append(entry)
        copies = sum(s.store.copy_rows_stored() for s in shards)
        print(f"round {r}{' (warm-up)' if entry['warmup'] else ''}: {entry['clients']:,} clients, {entry['rows']:,} "
              f"rows, {span.wall:.2f} s wall ({span.cpu:.2f} s CPU) | round peak RSS "
              f"{entry['peak_rss_bytes'] / GB:.2f} GB, "
              f"after {entry['rss_after_bytes'] / GB:.2f} GB | private state {entry['store_bytes'] / MB:,.0f} MB "
              f"(trained-copy rows kept: {copies:,})", flush=True)

    timed_rounds = [e for e in rounds if not e["warmup"]]
    seconds = [e["seconds"] for e in timed_rounds]
    result = {"label": label, "population": data.n_users, "per_round": per_round, "participation": participation,
              "shards": len(shards), "setup_s": setup.wall, "setup_peak_rss_gb": setup_peak / GB,
              "rounds_run": len(rounds), "timed_rounds": len(timed_rounds),
              "round_seconds": [e["seconds"] for e in rounds],
              "round_clients": [e["clients"] for e in rounds], "round_rows": [e["rows"] for e in rounds],
              "round_cpu_seconds": [e["cpu_seconds"] for e in rounds],
              "round_peak_rss_gb": [e["peak_rss_bytes"] / GB for e in rounds],
              "store_mb": [e["store_bytes"] / MB for e in rounds],
              "s_per_round": float(np.mean(seconds)) if seconds else None,
              "s_per_round_cpu": float(np.mean([e["cpu_seconds"] for e in timed_rounds])) if seconds else None,
              "s_per_round_min": float(np.min(seconds)) if seconds else None,
              "peak_rss_gb": max([setup_peak, *[e["peak_rss_bytes"] for e in rounds]]) / GB,
              "stopped": stopped}
    if len(rounds) >= 2:
        trained_after_first = max(1, sum(e["clients"] for e in rounds[1:]))
        per_user = (rounds[-1]["store_bytes"] - rounds[0]["store_bytes"]) / trained_after_first
        result["store_bytes_per_trained_user"] = per_user
    mean = "n/a" if result["s_per_round"] is None else f"{result['s_per_round']:.2f} s"
    print(f"{label}: {mean} per round (mean of {len(timed_rounds)} after {min(args.warmup, len(rounds))} warm-up; "
          f"all rounds: {', '.join(f'{s:.2f}' for s in result['round_seconds'])} s); peak RSS of the setting "
          f"{result['peak_rss_gb']:.2f} GB" + (f"; {stopped}" if stopped else ""), flush=True)

    if args.score_sample and shards:
        # in the user batches Shard.evaluate uses (its row budget), so memory is what evaluation needs
        from pipeline.federated.engine import shard as shard_module

        batch = max(1, getattr(shard_module, "_EVAL_ROW_BUDGET", 1 << 21) // data.n_items)
        sample = shards[0].users[:: max(1, len(shards[0].users) // args.score_sample)][: args.score_sample]
        reset_phase_peak()
        with timed() as span:
            for start in range(0, len(sample), batch):
                shards[0].scores(strategy.globals, torch.as_tensor(sample[start:start + batch]))
        result["score_sample_users"] = len(sample)
        result["score_sample_s"] = span.wall
        result["score_sample_peak_rss_gb"] = phase_peak_rss_bytes() / GB
        print(f"evaluation (not in the round): scoring {len(sample):,} users x {data.n_items:,} items "
              f"({batch} users per call) took {span.wall:.2f} s ({span.cpu:.2f} s CPU), phase peak RSS "
              f"{result['score_sample_peak_rss_gb']:.2f} GB -> all {data.n_users:,} users "
              f"~{span.wall * data.n_users / len(sample):,.0f} s (linear extrapolation)", flush=True)
    if args.profile:
        profile_round(strategy, pools)
    del shards, strategy, pools
    release_memory()
    return result


def compare(a: dict | None, b: dict | None, warmup: int) -> dict:
    """Seconds of setting a / setting b at the same round indices (the same number of rounds of
    private state behind them): per index, and summed over the timed indices both ran."""
    out = {"rounds": [], "wall": [], "cpu": [], "timed_wall": None, "timed_cpu": None}
    if not a or not b:
        return out
    common = range(min(len(a["round_seconds"]), len(b["round_seconds"])))
    out["rounds"] = list(common)
    out["wall"] = [a["round_seconds"][i] / b["round_seconds"][i] for i in common]
    out["cpu"] = [a["round_cpu_seconds"][i] / b["round_cpu_seconds"][i] for i in common]
    timed_common = [i for i in common if i >= warmup]
    if timed_common:
        out["timed_wall"] = (sum(a["round_seconds"][i] for i in timed_common)
                             / sum(b["round_seconds"][i] for i in timed_common))
        out["timed_cpu"] = (sum(a["round_cpu_seconds"][i] for i in timed_common)
                            / sum(b["round_cpu_seconds"][i] for i in timed_common))
    out["timed_rounds"] = timed_common
    return out


def profile_round(strategy, pools, top: int = 18) -> None:
    """One more round of run_rounds under cProfile: where the time of a round goes."""
    import cProfile
    import io
    import pstats

    from pipeline.federated.rounds import run_rounds

    round_ = strategy.next_round
    profiler = cProfile.Profile()
    profiler.enable()
    run_rounds(strategy, pools, rounds=1)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    print(f"profile of round {round_} (cProfile, by own time):")
    print("\n".join(line for line in text.getvalue().splitlines() if line.strip()))


def run_ray(data, per_round: int, args) -> dict:
    """The main setting through real Ray ClientPool actors: the product's round loop
    (rounds.run_rounds) on pool.RayPools, as the job's Server plays it, no evaluation scheduled."""
    import ray

    from pipeline.federated.runtime.placement import PoolPlan
    from pipeline.federated.runtime.pool import RayPools
    from pipeline.federated.rounds import run_rounds
    from pipeline.federated.strategy import Strategy

    participation = per_round / data.n_users
    total = args.warmup + args.rounds
    cfg = make_config(participation, no_evaluation(total))
    print(f"\n== Ray: {args.ray_pools} ClientPool actors (1 CPU, 1 thread each), population {data.n_users:,}, "
          f"{per_round:,} per round", flush=True)
    started = time.perf_counter()
    ray.init(address="local", num_cpus=max(2, args.ray_pools), include_dashboard=False, log_to_driver=False,
             configure_logging=False)  # a cluster of its own, never another one on this machine
    try:
        strategy = Strategy(cfg, data, n_pools=args.ray_pools)
        pools = RayPools(cfg.model_dump_json(), ray.put(data), None, strategy,
                         PoolPlan(pools=args.ray_pools, cpus_per_pool=1.0, gpus_per_pool=0.0))
        pids = [info["pid"] for info in pools.info()]
        startup = time.perf_counter() - started
        rounds = []
        for r in range(total):  # one round per call: each is timed on its own
            t0 = time.perf_counter()
            run_rounds(strategy, pools, rounds=1)
            rounds.append(time.perf_counter() - t0)
            pool_hwm = [_proc_hwm(pid) for pid in pids]
            print(f"ray round {r}{' (warm-up)' if r < args.warmup else ''}: {rounds[-1]:.2f} s; pool peak RSS "
                  + ", ".join("n/a" if h is None else f"{h / GB:.2f} GB" for h in pool_hwm), flush=True)
        timed_rounds = rounds[args.warmup:]
        result = {"pools": len(pools.actors), "startup_s": startup, "round_seconds": rounds,
                  "s_per_round": float(np.mean(timed_rounds)) if timed_rounds else None,
                  "pool_peak_rss_gb": [None if h is None else h / GB for h in (_proc_hwm(pid) for pid in pids)]}
        print(f"ray: {result['s_per_round']:.2f} s per round (mean of {len(timed_rounds)}), startup {startup:.1f} s")
        return result
    finally:
        ray.shutdown()


def _proc_hwm(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="100K users, 1K per round")
    p.add_argument("--population", type=int, default=None, help="main population (default 1,000,000; quick 100,000)")
    p.add_argument("--per-round", type=int, default=None, help="sampled users per round (default 10,000; quick 1,000)")
    p.add_argument("--items", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per setting (default 3; quick 1)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--shards", type=int, default=2, help="in-process Shards (default 2, like runtime.pools=2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, one pool's share)")
    p.add_argument("--settings", default="main,small_pop,double",
                   help="which of main, small_pop, double to run (comma-separated)")
    p.add_argument("--rss-limit-gb", type=float, default=8.0)
    p.add_argument("--abort-gb", type=float, default=14.0,
                   help="stop a setting when the next round's projected peak RSS exceeds this")
    p.add_argument("--score-sample", type=int, default=None, help="users scored once to time evaluation (0: skip)")
    p.add_argument("--profile", action="store_true", help="cProfile one extra round of each setting")
    p.add_argument("--ray", action="store_true", help="also train the main setting through Ray ClientPool actors")
    p.add_argument("--ray-pools", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    p.add_argument("--device", default="cpu",
                   help="torch device of the shards (cuda: private state and local training on the GPU)")
    args = p.parse_args(argv)
    if args.population is None:
        args.population = 100_000 if args.quick else 1_000_000
    if args.per_round is None:
        args.per_round = 1_000 if args.quick else 10_000
    if args.score_sample is None:
        args.score_sample = 200 if args.quick else 1000
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    return args


def main(argv=None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    threads = set_threads(args.threads)
    print(f"bench.scale: {BACKBONE} rounds of rounds.run_rounds on in-process pools, no evaluation scheduled")
    print(machine_line(threads))
    print(device_line(args.device))
    available = mem_available_bytes()
    abort_bytes = int(args.abort_gb * GB)
    if available is not None:
        abort_bytes = min(abort_bytes, int(0.85 * (available + current_rss_bytes())))
    print(f"memory: MemAvailable {available / GB if available else float('nan'):.1f} GB; RSS limit "
          f"{args.rss_limit_gb:g} GB; abort limit {abort_bytes / GB:.1f} GB")

    wanted = [s.strip() for s in args.settings.split(",") if s.strip()]
    small_population = max(args.per_round, args.population // 10)
    figures = {"bench": "scale", "quick": bool(args.quick), "threads": threads, "backbone": BACKBONE,
               "items": args.items, "shards": args.shards, "rss_limit_gb": args.rss_limit_gb,
               "data": {}, "settings": {}}

    data, info = make_dataset(args.population, args.items, args.seed)
    figures["data"][str(args.population)] = info
    if "main" in wanted:
        figures["settings"]["main"] = run_setting("main", data, args.per_round, args, abort_bytes)
    if args.ray:
        figures["ray"] = run_ray(data, args.per_round, args)
    if "double" in wanted:
        figures["settings"]["double"] = run_setting("double S", data, 2 * args.per_round, args, abort_bytes)
    del data
    release_memory()
    if "small_pop" in wanted:
        small, info = make_dataset(small_population, args.items, args.seed)
        figures["data"][str(small_population)] = info
        figures["settings"]["small_pop"] = run_setting("small pop", small, args.per_round, args, abort_bytes)
        del small
        release_memory()

    s = figures["settings"]
    for other in ("small_pop", "double"):
        ratios = compare(s.get(other), s.get("main"), args.warmup)
        figures[f"ratio_{other}_over_main"] = ratios["timed_wall"]
        figures[f"ratio_{other}_over_main_cpu"] = ratios["timed_cpu"]
        figures[f"ratio_{other}_over_main_by_round"] = ratios
    figures["process_peak_rss_gb"] = process_peak_rss_bytes() / GB
    training_peak = max([v["peak_rss_gb"] for v in s.values()], default=0.0)
    figures["training_peak_rss_gb"] = training_peak
    figures["rss_pass"] = figures["process_peak_rss_gb"] < args.rss_limit_gb
    figures["main_rss_pass"] = s["main"]["peak_rss_gb"] < args.rss_limit_gb if "main" in s else None

    print("\nsummary:")
    for key, v in s.items():
        mean = "n/a" if v["s_per_round"] is None else f"{v['s_per_round']:.2f} s/round"
        print(f"  {v['label']:>9}: population {v['population']:>9,}, {v['per_round']:>6,} per round: {mean} "
              f"(CPU {v['s_per_round_cpu'] or float('nan'):.2f} s; {v['timed_rounds']} timed of "
              f"{v['rounds_run']} run), "
              f"peak RSS {v['peak_rss_gb']:.2f} GB {'PASS' if v['peak_rss_gb'] < args.rss_limit_gb else 'FAIL'} "
              f"(< {args.rss_limit_gb:g} GB)" + (" [" + v["stopped"] + "]" if v["stopped"] else ""))
    show = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    for name, key, expect in (("small pop / main", "ratio_small_pop_over_main", "~1 if independent of population"),
                              ("double S / main", "ratio_double_over_main", "~2 if linear in sampled users")):
        by_round = figures[key + "_by_round"]
        rounds_text = ", ".join(f"r{i} {show(w)}/{show(c)}" for i, w, c in
                                zip(by_round["rounds"], by_round["wall"], by_round["cpu"]))
        print(f"  {name}: timed rounds {show(figures[key])} wall, {show(figures[key + '_cpu'])} CPU ({expect}); "
              f"per round index (wall/CPU, warm-up included): {rounds_text or 'n/a'}")
    if "ray" in figures and figures["ray"].get("s_per_round"):
        pool_peaks = [p for p in figures["ray"]["pool_peak_rss_gb"] if p is not None]
        print(f"  ray ClientPools: {figures['ray']['s_per_round']:.2f} s/round; pool peak RSS "
              f"{', '.join(f'{p:.2f}' for p in pool_peaks)} GB (sum {sum(pool_peaks):.2f} GB, shared object-store "
              f"pages counted in each) -> {'PASS' if sum(pool_peaks) < args.rss_limit_gb else 'FAIL'} against "
              f"{args.rss_limit_gb:g} GB")
    if args.device.startswith("cuda"):
        figures["gpu_peak_allocated_gb"] = torch.cuda.max_memory_allocated() / GB
        print(f"  peak GPU memory allocated by torch: {figures['gpu_peak_allocated_gb']:.2f} GB")
    print(f"  peak RSS of this process (includes data generation, not Ray workers): "
          f"{figures['process_peak_rss_gb']:.2f} GB -> "
          f"{'PASS' if figures['rss_pass'] else 'FAIL'} against {args.rss_limit_gb:g} GB")
    emit_json(figures)
    return figures


if __name__ == "__main__":
    main()
