"""Evaluation at scale: P3 and P1 of every user of a synthetic population (default about 50,000
users x 15,000 items, ID only), the matrix-product scorer against today's row-per-pair scorer.

    python -m bench.scale_eval            # 50,000 users x 15,000 items; the baseline on a user sample
    python -m bench.scale_eval --quick    # 4,000 users x 1,500 items; the baseline on every user

One in-process pool holds every user (no Ray; as one ClientPool would, on --threads torch
threads). After one training round of --train-users sampled clients (so personal state is not the
initial one; round 0 played by rounds.run_rounds, the product's round loop, on in_process pools,
with no evaluation scheduled in it), the same evaluator (pipeline/eval/protocols.evaluate, the test split) ranks:

  new       Shard.scorer: a block of users x all items as matrix products (P3), or only each
            user's target + 99 persisted negatives (P1: score_candidates)
  baseline  Shard.row_scorer: one (user, item) row per pair over all items (P3 and P1)

Both are timed on the same user sample (--baseline-users; every user with --quick) in this
process, and their metrics compared; the new scorer is then timed on every user (eval_s_p3,
eval_s_p1). baseline_eval_s_p3 / _p1 extrapolate the sample linearly to every user where the
sample is not every user (baseline_measured says which). Peak RSS per phase (Linux VmHWM).

--fedmr repeats it all for + FedMR (id + random text features of --text-width, 384) after one
training round of every user (--fedmr-train-users), trained in blocks of
runtime.train_block_clients clients (--fedmr-block-clients overrides it; null: all at once):
fedmr_round_s, fedmr_eval_s_p3 / _p1, and fedmr_peak_rss_gb, the process's peak from building
the FedMR shard to its last evaluation. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from bench._common import (GB, emit_json, machine_line, no_evaluation, phase_peak_rss_bytes,
                           process_peak_rss_bytes, release_memory, reset_phase_peak, set_threads, timed)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.scale_eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="4,000 users x 1,500 items, the baseline on every user")
    p.add_argument("--users", type=int, default=None, help="synthetic users (default 50,000; quick 4,000)")
    p.add_argument("--items", type=int, default=None, help="synthetic items (default 15,000; quick 1,500)")
    p.add_argument("--backbone", default="fcf", help="ID backbone (default fcf)")
    p.add_argument("--baseline-users", type=int, default=None,
                   help="users the row-per-pair baseline scores (default 2,000; quick: every user)")
    p.add_argument("--train-users", type=int, default=2000, help="clients of the one training round")
    p.add_argument("--fedmr", action="store_true",
                   help="also FedMR (id + random text features) on the same data, trained on every user")
    p.add_argument("--text-width", type=int, default=384, help="FedMR's text feature width")
    p.add_argument("--fedmr-train-users", type=int, default=0,
                   help="clients of FedMR's training round (default 0: every user)")
    p.add_argument("--fedmr-block-clients", default=None,
                   help="runtime.train_block_clients for FedMR's round (default: the config's; null: all at once)")
    p.add_argument("--fedmr-baseline-users", type=int, default=None,
                   help="users FedMR's row-per-pair baseline scores (default 100; quick: every user)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, one pool's share)")
    p.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    args = p.parse_args(argv)
    args.users = args.users or (4000 if args.quick else 50_000)
    args.items = args.items or (1500 if args.quick else 15_000)
    if args.baseline_users is None:
        args.baseline_users = 0 if args.quick else 2000  # 0: every user
    if args.fedmr_baseline_users is None:
        args.fedmr_baseline_users = 0 if args.quick else 100
    return args


def make_data(n_users: int, n_items: int, seed: int):
    from pipeline.data.negatives import sample_eval_negatives
    from pipeline.data.prepare import PrepareConfig, prepare
    from pipeline.data.synthetic import SyntheticConfig, generate

    with timed() as span:
        raw = generate(SyntheticConfig(n_users=n_users, n_items=n_items, images=False, seed=seed),
                       progress=False).dataset
        data = prepare(raw, PrepareConfig())
        del raw
        data.catalogue = None
        negatives = sample_eval_negatives(data, seed=seed)
    release_memory()
    print(f"data: synthetic {n_users:,} x {n_items:,} -> {data.n_users:,} users, {data.n_items:,} items, "
          f"{int(data.train_counts.sum()):,} training positives; P1 negatives {negatives.test.shape[1]} per user "
          f"({span.wall:.1f} s)", flush=True)
    return data, negatives


def evaluate_timed(scorer, data, negatives, protocol: str, users: np.ndarray,
                   baseline: bool = False) -> tuple[dict, float, float]:
    """(metrics, wall seconds, phase peak RSS GB) of the test split over `users`, in the user
    batches Shard.evaluate uses (the baseline: those it used before, all items per user)."""
    from pipeline.eval.protocols import evaluate
    from pipeline.federated.engine import shard as shard_module

    width = data.n_items if protocol == "p3" or baseline else 1 + negatives.test.shape[1]
    batch = max(1, shard_module._EVAL_ROW_BUDGET // width)
    release_memory()
    reset_phase_peak()
    with timed() as span:
        metrics = evaluate(scorer, data, protocol, "test", negatives=negatives, users=users, batch_users=batch)
    return metrics, span.wall, phase_peak_rss_bytes() / GB


def one_round(n_users: int, train_users: int) -> list[str]:
    """Config overrides of the training round: `train_users` sampled clients (0: every user) and
    no evaluation scheduled in it."""
    trained = n_users if train_users <= 0 or train_users >= n_users else train_users
    return [f"train.participation={trained / n_users!r}", *no_evaluation(1)]


def measure(label: str, prefix: str, cfg, data, negatives, args, baseline_users: int) -> dict:
    """One model: round 0 of the product's round loop (rounds.run_rounds on in-process pools,
    the clients cfg samples, no evaluation), then both scorers
    on a user sample (0: every user) and the new one on every user. Figures keyed `prefix` +
    name; peak_rss_gb is the process's peak from building the shard to the last evaluation."""
    from pipeline.federated.rounds import in_process, run_rounds

    release_memory()
    reset_phase_peak()
    strategy, pools = in_process(cfg, data, negatives)
    [shard] = pools.pools  # one pool: every user
    with timed() as span:
        [played] = run_rounds(strategy, pools, rounds=1)
    g = strategy.globals
    trained = np.arange(played["train/clients"])  # only their number is reported
    rng = np.random.default_rng(args.seed)
    peak = phase_peak_rss_bytes() / GB
    block = cfg.runtime.train_block_clients
    print(f"\n== {label}: one training round of {len(trained):,} clients "
          f"({'all at once' if block is None else f'in blocks of {block:,}'}): {span.wall:.1f} s, "
          f"peak RSS {peak:.2f} GB", flush=True)

    everyone = np.arange(data.n_users)
    sample = everyone if baseline_users <= 0 or baseline_users >= data.n_users else \
        np.sort(rng.choice(data.n_users, size=baseline_users, replace=False))
    scale = data.n_users / len(sample)
    figures = {"baseline_users": len(sample), "baseline_measured": bool(len(sample) == data.n_users),
               "train_users": len(trained), "train_block_clients": block, "round_s": span.wall}
    new = shard.scorer(g)
    for protocol in ("p3", "p1"):
        old = shard.row_scorer(g, protocol, "test")
        base_metrics, base_s, base_rss = evaluate_timed(old, data, negatives, protocol, sample, baseline=True)
        same_metrics, same_s, same_rss = evaluate_timed(new, data, negatives, protocol, sample)
        diff = max(abs(base_metrics[k] - same_metrics[k]) for k in base_metrics)
        full_metrics, full_s, full_rss = evaluate_timed(new, data, negatives, protocol, everyone)
        peak = max(peak, base_rss, same_rss, full_rss)
        figures[f"eval_s_{protocol}"] = full_s
        figures[f"eval_peak_rss_gb_{protocol}"] = full_rss
        figures[f"baseline_eval_s_{protocol}"] = base_s * scale
        figures[f"baseline_sample_s_{protocol}"] = base_s
        figures[f"baseline_peak_rss_gb_{protocol}"] = base_rss
        figures[f"sample_s_{protocol}"] = same_s
        figures[f"speedup_{protocol}"] = base_s / same_s if same_s > 0 else None
        figures[f"max_metric_diff_{protocol}"] = diff
        figures[f"hr@10_{protocol}"] = full_metrics["hr@10"]
        print(f"{protocol.upper()}: on {len(sample):,} users: rows per pair {base_s:.2f} s, matrix products "
              f"{same_s:.2f} s -> x{figures[f'speedup_{protocol}']:.1f}; largest metric difference {diff:.2e}. "
              f"Every user ({data.n_users:,}): {full_s:.2f} s (peak RSS {full_rss:.2f} GB); rows per pair "
              f"{'measured' if scale == 1 else 'extrapolated'} {base_s * scale:.1f} s", flush=True)
    figures["peak_rss_gb"] = peak
    del shard, new
    release_memory()
    return {prefix + key: value for key, value in figures.items()}


def with_text(data, width: int, seed: int):
    """Random L2-normalised text features [I, width] (FedMR's frozen input; scale, not quality)."""
    import dataclasses

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(data.n_items, width)).astype(np.float32)
    return dataclasses.replace(data, features={"text": x / np.linalg.norm(x, axis=1, keepdims=True)})


def main(argv=None) -> dict:
    from pipeline.config import load_config

    args = parse_args(sys.argv[1:] if argv is None else argv)
    threads = set_threads(args.threads)
    print(f"bench.scale_eval: {args.backbone} evaluation of every user, matrix products vs rows per pair")
    print(machine_line(threads))
    data, negatives = make_data(args.users, args.items, args.seed)
    figures = {"bench": "scale_eval", "quick": bool(args.quick), "threads": threads, "backbone": args.backbone,
               "users": data.n_users, "items": data.n_items}
    cfg = load_config(None, [f"model.backbone={args.backbone}", *one_round(data.n_users, args.train_users)])
    figures.update(measure("ID only", "", cfg, data, negatives, args, args.baseline_users))
    if args.fedmr:
        data = with_text(data, args.text_width, args.seed)
        cfg = load_config(None, [f"model.backbone={args.backbone}", "model.fusion={modalities: [id, text]}",
                                 *one_round(data.n_users, args.fedmr_train_users),
                                 *([f"runtime.train_block_clients={args.fedmr_block_clients}"]
                                   if args.fedmr_block_clients is not None else [])])
        figures["text_width"] = args.text_width
        figures.update(measure(f"+ FedMR (id + text {args.text_width})", "fedmr_", cfg, data, negatives, args,
                               args.fedmr_baseline_users))
    figures["process_peak_rss_gb"] = process_peak_rss_bytes() / GB
    emit_json(figures)
    return figures


if __name__ == "__main__":
    main()
