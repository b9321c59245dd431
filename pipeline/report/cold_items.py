"""Where a model's hits come from: users whose held-out item never occurs in training ("cold")
against the others ("warm"), beside the trivial rankings.

    python -m pipeline.report.cold_items --configs configs/ku/fcf.yaml configs/ku/fcf_fedmr.yaml \
        --seeds 0 --out results/ku_cold_items.md [--set KEY=VALUE ...] [--note TEXT]

Each (config, seed) is trained in this process on one Shard holding every user (no Ray: the
engine's numbers do not depend on how users are split into pools) with the config's schedule
and the same selection as `train` (validation only, strictly better, patience). At every
evaluated round the config's protocol is evaluated on all users and on the cold and warm users
of the split; the table reports them at the best-validation round. The trivial rankings are
evaluated on the same subsets.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from pipeline.data.store import write_text_atomically

SUBSETS = ("all", "cold", "warm")


def cold_users(data, split: str) -> np.ndarray:
    """[U] bool: the user's held-out item of `split` never occurs in the training split."""
    target = data.valid_item if split == "valid" else data.test_item
    return data.item_popularity()[target] == 0


def subset_metrics(scorer, data, negatives, protocol: str, split: str, ks) -> dict:
    """{subset: metrics} over all users, the cold and the warm users of `split` (empty subsets: {})."""
    from pipeline.eval.protocols import evaluate

    cold = cold_users(data, split)
    out = {}
    for name, users in (("all", np.arange(data.n_users)), ("cold", np.flatnonzero(cold)),
                        ("warm", np.flatnonzero(~cold))):
        out[name] = evaluate(scorer, data, protocol, split, negatives=negatives, ks=ks, users=users) if len(users) else {}
    return out


def train_and_break_down(config, data, negatives, log=print) -> dict:
    """Train `config` in-process; returns {best_round, rounds_run, valid: {subset: m}, test: {...}}."""
    from pipeline.federated.strategy.aggregate import apply_uploads, feature_dims, initial_state, participants, round_lrs
    from pipeline.federated.strategy.schedule import evaluates
    from pipeline.federated.strategy.selection import Selection
    from pipeline.federated.engine.shard import Shard

    train, fusion = config.train, config.model.fusion
    if fusion is not None and fusion.fusion_agg == "grad_adam":
        raise ValueError("cold_items trains fusion_agg=fedavg only (the server Adam step lives in the Ray server)")
    init = initial_state(config, data.n_users, data.n_items, feature_dims(data) if fusion is not None else None)
    shard = Shard(config, data, negatives, np.arange(data.n_users), init)
    g = dict(init.global_params)
    selection = Selection(train.selection(), train.patience)
    best, round_ = None, 0
    for round_ in range(train.rounds):
        users = participants(data.n_users, train.participation, train.seed, round_)
        g = apply_uploads(g, [shard.train(round_, g, users, round_lrs(config, data.n_items, round_))])
        if not evaluates(train, round_):
            continue
        found = {split: subset_metrics(shard.scorer(g, train.protocol, split), data, negatives, train.protocol,
                                       split, train.eval_ks)
                 for split in ("valid", "test")}
        flat = {f"{split}/{k}": v for split in found for k, v in found[split]["all"].items()}
        if selection.update(round_, flat):
            best = {"best_round": round_, **found}
        log(f"  round {round_}: valid {train.selection()} {100 * flat[f'valid/{train.selection()}']:.2f}"
            f"{' (best)' if best and best['best_round'] == round_ else ''}")
        if selection.should_stop():
            break
    return {**best, "rounds_run": round_ + 1}


def baseline_rows(data, negatives, protocol: str, ks) -> dict:
    """{baseline name: {split: {subset: metrics}}}."""
    from pipeline.eval.baselines import BASELINES

    return {name: {split: subset_metrics(make(data), data, negatives, protocol, split, ks)
                   for split in ("valid", "test")}
            for name, make in BASELINES.items()}


def render(rows: list[dict], data, protocol: str, metric: str, command: str, overrides=(), notes=()) -> str:
    """Markdown: one line per method (mean over its seeds; best rounds per seed when several),
    columns test/valid x all/cold/warm; `overrides` (the --set of every run) and `notes` shown."""
    cold_test, cold_valid = cold_users(data, "test"), cold_users(data, "valid")
    lines = [f"<!-- made by: {command} -->",
             f"# {data.name}: hits on users whose held-out item is cold (never in training) or warm",
             "",
             f"Protocol {protocol.upper()}, {metric.upper()} in %, at each run's best-validation "
             f"round (selection on all users' validation). Cold users: {int(cold_test.sum())} of {data.n_users} "
             f"in test, {int(cold_valid.sum())} in validation; "
             f"{int((data.item_popularity() == 0).sum())} of {data.n_items} items never occur in training. "
             "Runs train in this process in float32; rounding accumulates over rounds, so a seed's numbers "
             "(and its best round) can differ from the same seed's Ray run in the results tables.",
             *([f"Every run with: `{' '.join(overrides)}`."] if overrides else []),
             "",
             "| Method | seeds | best round | test all | test cold | test warm | valid all | valid cold | valid warm |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        cells = []
        for split in ("test", "valid"):
            for subset in SUBSETS:
                values = [r[split][subset].get(metric) for r in row["runs"]]
                cells.append("—" if any(v is None for v in values) else f"{100 * float(np.mean(values)):.2f}")
        rounds = [r["best_round"] for r in row["runs"] if r.get("best_round") is not None]
        each = f" ({', '.join(str(r) for r in rounds)})" if len(rounds) > 1 else ""
        lines.append(f"| {row['label']} | {len(row['runs'])} | {np.mean(rounds):.1f}{each} | " + " | ".join(cells) + " |"
                     if rounds else f"| {row['label']} | — | — | " + " | ".join(cells) + " |")
    lines += [line for note in notes for line in ("", f"**Note:** {note}")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import load_config
    from pipeline.data.datasets import open_dataset
    from pipeline.report.tables import config_label

    parser = argparse.ArgumentParser(prog="python -m pipeline.report.cold_items", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, help="write the Markdown table here")
    parser.add_argument("--note", action="append", default=[], metavar="TEXT",
                        help="a note under the table (repeatable), e.g. what the overrides test")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python -m pipeline.report.cold_items " + " ".join(shlex.quote(a) for a in
                                                                  (sys.argv[1:] if argv is None else argv))
    configs = [load_config(path, list(args.set)) for path in args.configs]
    protocols = {c.train.protocol for c in configs}
    metrics = {f"hr@{max(c.train.eval_ks)}" for c in configs}
    if len(protocols) != 1 or len(metrics) != 1:
        raise SystemExit(f"--configs must share one protocol and K (got {sorted(protocols)}, {sorted(metrics)})")
    protocol, metric = protocols.pop(), metrics.pop()
    data, negatives = open_dataset(configs[0].data)
    ks = configs[0].train.eval_ks
    rows = [{"label": f"{name} (trivial)", "runs": [found]}
            for name, found in baseline_rows(data, negatives, protocol, ks).items()]
    for path, config in zip(args.configs, configs):
        runs = []
        for seed in args.seeds:
            seeded = load_config(path, [*args.set, f"train.seed={seed}", f"train.model_seed={seed}"])
            print(f"{path} seed {seed}:", flush=True)
            with_features = seeded.model.fusion is not None
            run_data = open_dataset(seeded.data)[0] if with_features else data
            runs.append(train_and_break_down(seeded, run_data, negatives))
        rows.append({"label": config_label(config), "runs": runs})
    text = render(rows, data, protocol, metric, command, overrides=args.set, notes=args.note)
    print(text)
    if args.out:
        write_text_atomically(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
