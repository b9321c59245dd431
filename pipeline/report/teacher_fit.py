"""What GFMFR's teacher could give and how much of it the group fusion model keeps.

    python -m pipeline.report.teacher_fit --configs configs/synthetic_groups/fcf_gfmfr_planted.yaml \
        --seeds 0 --rounds 6 --out results/synthetic_groups_teacher_fit.md

Each (config, seed) trains in this process (one Shard with every user, the server's
GroupServer; no Ray) for --rounds rounds of the config's schedule. After every round's group
step it evaluates on validation, under the config's protocol and its largest cut-off K:

- student: the clients' own model (what the run reports);
- teacher: every grouped user ranks the items by its group's teacher scores s_g, the scores
  the next round distils (the group's mean head on f_phi's item table);
- teacher on the true targets: the same head on the group's target table itself (the members'
  mean trained table f_phi regresses from content), i.e. the teacher f_phi would give if it
  fitted its targets exactly;

and f_phi's relative error |f_phi - target| / |target| (1: no better than predicting zeros).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from pipeline.data.store import write_text_atomically

COLUMNS = ("student", "teacher", "target_teacher", "relative_error")


def trace(config, log=print) -> list[dict]:
    """[{round, student, teacher, target_teacher, relative_error}] of `config` (fractions)."""
    from pipeline.data.datasets import open_dataset
    from pipeline.eval.protocols import evaluate
    from pipeline.federated.strategy.aggregate import apply_uploads, feature_dims, initial_state, participants, round_lrs
    from pipeline.federated.strategy.group_server import GroupServer
    from pipeline.federated.engine.shard import Shard
    from pipeline.models import model_for
    from pipeline.report.groups import group_scores_hr

    if config.model.gfmfr is None:
        raise ValueError(f"{config.name}: not a GFMFR config (model.gfmfr is off)")
    if config.model.fusion is not None and config.model.fusion.fusion_agg == "grad_adam":
        raise ValueError("teacher_fit trains fusion_agg=fedavg only (the server Adam step lives in the Ray server)")
    data, negatives = open_dataset(config.data)
    train, n_groups = config.train, config.model.gfmfr.group_num
    k = max(train.eval_ks)
    init = initial_state(config, data.n_users, data.n_items, feature_dims(data))
    shard = Shard(config, data, negatives, np.arange(data.n_users), init)
    features = {m: torch.as_tensor(np.asarray(x)) for m, x in data.features.items()}
    groups = GroupServer(config, model_for(config.model), init, features, data.n_users, data.n_items)
    groups.keep_target_scores = True

    g, out = dict(init.global_params), []
    for round_ in range(train.rounds):
        users = participants(data.n_users, train.participation, train.seed, round_)
        upload = shard.train(round_, g, users, round_lrs(config, data.n_items, round_), groups.download(round_))
        downloaded, g = g, apply_uploads(g, [upload])
        metrics = groups.step(round_, [upload], lambda ids: [shard.group_sums(ids[0], n_groups)], downloaded, g)
        student = evaluate(shard.scorer(g, train.protocol, "valid"), data, train.protocol, "valid",
                           negatives=negatives, ks=(k,))[f"hr@{k}"]
        row = {"round": round_, "student": student,
               "teacher": group_scores_hr(groups.scores, groups.known, config, data, negatives),
               "target_teacher": group_scores_hr(groups.target_scores, groups.known, config, data, negatives),
               "relative_error": metrics["group/fusion_relative_error"]}
        out.append(row)
        log(f"  round {round_}: valid HR@{k} student {100 * row['student']:.2f}, teacher {100 * row['teacher']:.2f}, "
            f"teacher on the true targets {100 * row['target_teacher']:.2f}; f_phi relative error "
            f"{row['relative_error']:.3f}")
    return out


def render(results: dict[str, list[list[dict]]], k: int, protocol: str, command: str, notes=()) -> str:
    """results: label -> one trace per seed. One line per (label, round): means over seeds."""
    lines = [f"<!-- made by: {command} -->", "# GFMFR: the teacher against what its targets would give", "",
             f"Validation HR@{k} in % under {protocol.upper()}, every round, mean over seeds. Student: the "
             "clients' own model. Teacher: each grouped user ranks items by its group's teacher scores (the mean "
             "head on f_phi's item table; what the next round distils). Teacher on the true targets: the same head "
             "on the group's target table itself (the members' mean trained table that f_phi regresses from "
             "content). Relative error: |f_phi - target| / |target| (1 = no better than zeros).", "",
             "| Method | seeds | round | student | teacher | teacher on the true targets | f_phi relative error |",
             "|---|---|---|---|---|---|---|"]
    for label, traces in results.items():
        for round_ in range(min(len(t) for t in traces)):
            rows = [t[round_] for t in traces]

            def mean(name, scale=100.0, digits=2):
                return f"{scale * float(np.mean([r[name] for r in rows])):.{digits}f}"

            lines.append(f"| {label} | {len(traces)} | {round_} | {mean('student')} | {mean('teacher')} | "
                         f"{mean('target_teacher')} | {mean('relative_error', 1.0, 3)} |")
    lines += [line for note in notes for line in ("", f"**Note:** {note}")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import load_config
    from pipeline.report.tables import config_label

    parser = argparse.ArgumentParser(prog="python -m pipeline.report.teacher_fit",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--rounds", type=int, default=6, help="rounds per run (overrides train.rounds)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--note", action="append", default=[], metavar="TEXT", help="a note under the table")
    parser.add_argument("--out", type=Path, help="write the Markdown table here")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python -m pipeline.report.teacher_fit " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    results, ks, protocols = {}, set(), set()
    for path in args.configs:
        traces = []
        for seed in args.seeds:
            config = load_config(path, [*args.set, f"train.rounds={args.rounds}", f"train.seed={seed}",
                                        f"train.model_seed={seed}"])
            ks.add(max(config.train.eval_ks))
            protocols.add(config.train.protocol)
            print(f"{path} seed {seed}:", flush=True)
            traces.append(trace(config))
        results[config_label(config)] = traces
    if len(ks) != 1 or len(protocols) != 1:
        raise SystemExit(f"--configs must share one protocol and K (got {sorted(protocols)}, {sorted(ks)})")
    text = render(results, ks.pop(), protocols.pop(), command, args.note)
    print(text)
    if args.out:
        write_text_atomically(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
