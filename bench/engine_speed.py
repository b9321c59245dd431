"""Speed benchmark: the vectorised engine against the one-client-at-a-time oracle, one process.

    python -m bench.engine_speed            # MovieLens-100K-MM, all 943 users per round, 2 rounds
    python -m bench.engine_speed --quick    # 200 users per round, 1 round (under a minute)
    python -m bench.engine_speed --backbones fedrap_fedmr --rounds 1 --threads 2   # FedRAP + FedMR

A backbone named <backbone>_fedmr carries FedMR's fusion module (project defaults: moe, local
router, history mixing, d_f 64) on the encoded item features of --features (the embedded
encoders' MovieLens store by default: MiniLM text 384-d, EfficientNet-Lite0 posters 1280-d);
the oracle then trains on the CPU. Its FLOP count is the GEMM FLOPs of the module's Linear
layers in their dense form (fusion_gemm_flops), per fused row and per router row as counted in
the engine's steps; the torch.bmm FLOPs the engine actually ran (fewer: frozen-feature
projections may run as Gram-row products, client.FeatureSpan) are printed beside them.

For each backbone (PFedRec, FedRAP; P1 preset: protocol p1, neg_ratio 4, 5 local epochs, the
pipeline/config.py defaults otherwise) both sides start from the same seeded initial model and
run the same rounds on the same participants, in float32, at the same torch thread count:

- engine: the product's round, played by rounds.run_rounds (the one round loop the job runs) on
  in-process pools (rounds.in_process: --shards Shards driven one after the other, no Ray;
  default one holding every user): participants and arrivals, every pool's local training,
  aggregation (privacy and FedMR's server Adam step when the config has them), with no
  evaluation scheduled in the timed rounds (train.eval_round0=false, train.eval_every past them);
- oracle: reference.oracle.run_oracle (textbook trainer, one client after another), one round per
  call (start=r), so each round is timed on its own.

Each round is timed on both sides (wall and process CPU seconds; the two sides alternate which
goes first); ratio = oracle seconds / engine seconds. After the rounds the two states are
compared ("equal metrics"): max |difference| of the global and personal parameters and of
every user's scores over all items, and validation HR@10 under P1 of both.

Achieved GFLOP/s of local training = analytic FLOPs of the local-training math (see
local_training_flops: forward + backward + SGD per row, per client-step head updates) divided
by the seconds the engine spends in client.train_clients (measured by wrapping it), against a
measured GEMM peak (torch.mm, float32, best of a few runs, same thread count).

--oracle-users K times the oracle on a fixed random subset of K participants per round and
extrapolates linearly per client (labelled EXTRAPOLATED; the equality check is then skipped).
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from bench._common import (emit_json, fmt_s, gemm_peak_gflops, loadavg_1min, machine_line, no_evaluation,
                           peak_rss_bytes, set_threads, synchronize, timed, device_line, Span, GB)
from bench.fedmr_round import BmmMeter

BACKBONES = ("pfedrec", "fedrap")
TARGET_SPEEDUP = 20.0  # ID backbones: engine vs oracle
FUSION_TARGET_FRACTION = 0.5  # a fusion module's local training, of the GEMM peak
QUICK_USERS = 200
WARMUP_CLIENTS = 4


# --- analytic FLOPs of local training ----------------------------------------------------------

FLOP_CONVENTION = ("1 FLOP per scalar add/sub/mul/div/max/abs/sign/exp/log1p/sigmoid; gathers and "
                   "scatters count 0 except the add of an accumulation")


def local_training_flops(backbone: str, update: str, d: int) -> tuple[int, int, str]:
    """(FLOPs per training row, FLOPs per client-step, formula text) of the local-training math.

    Per row of a mini-batch (one (client, item) pair), d = dim:
      logit  w.x + b                           2d      BCE (stable, on logits)            7
      per-client batch mean (segment sum)      1       dL/dz = (sigmoid(z) - y) / n_c     3
      grad w (dz * x, accumulated)             2d      grad b                             1
      grad of the item row (dz * w, scatter-add) 2d    SGD on an item row (lr * g, sub)   2d
    PFedRec two_step: (a) head step  fwd 2d+8 + bwd 2d+4           = 4d + 12
                      (b) item step  fwd 2d+8 + bwd 2d+3 + SGD 2d  = 6d + 11   -> 10d + 23 per row
    PFedRec joint:    fwd 2d+8 + bwd 4d+4 + SGD 2d                              ->  8d + 12 per row
    FedRAP:           fwd s = p + c (d) + logit/BCE/mean 2d+8                   =  3d + 8
                      regulariser -l*mean((p-c)^2) + m*mean|c|: 5d + 4
                      bwd dz 3, grad w 2d, grad b 1, ds = dz*w d, reg grads 3d,
                          grad p, grad c combine 3d, scatter-adds 2d             = 11d + 4
                      SGD on the p and c rows 4d                                -> 23d + 16 per row
    Per client-step (client x mini-batch): head SGD 2(d+1) + the batch-mean division(s).
    """
    if backbone == "pfedrec" and update == "two_step":
        return 10 * d + 23, 2 * (d + 1) + 2, "PFedRec two_step: (10d + 23) per row + (2d + 4) per client-step"
    if backbone == "pfedrec":
        return 8 * d + 12, 2 * (d + 1) + 1, "PFedRec joint: (8d + 12) per row + (2d + 3) per client-step"
    if backbone == "fedrap":
        return 23 * d + 16, 2 * (d + 1) + 1, "FedRAP: (23d + 16) per row + (2d + 3) per client-step"
    raise ValueError(f"no FLOP model for backbone {backbone!r}")


def fusion_gemm_flops(fusion, d_id: int, feature_dims: dict[str, int]) -> tuple[int, int, str]:
    """(FLOPs per fused row, FLOPs per router row, formula text): the GEMM FLOPs of the fusion
    module's Linear layers, forward (2 in out) + backward (4 in out: input and weight gradients;
    2 in out for the projections of frozen features, whose input needs no gradient). A fused row
    is one distinct (client, item) row the experts run on in a step (the step's rows and the
    clients' training positives); router rows are the mixing rows (history: the positives).
    Elementwise work (LayerNorm, activations, dropout, mixing) and the backbone's own per-row
    math (a few d per row) are not counted."""
    d_f, mods = fusion.d_f, fusion.modalities
    width = {"id": d_id, **feature_dims}
    per_row, parts = 0, []

    def linear(fan_in, fan_out, frozen_input=False, label=""):
        nonlocal per_row
        flops = (4 if frozen_input else 6) * fan_in * fan_out
        per_row += flops
        parts.append(f"{label} {fan_in}x{fan_out} ({'4' if frozen_input else '6'} in out)")

    for m in mods:
        linear(width[m], d_f, frozen_input=m != "id", label=f"proj.{m}")
    experts = ("sum", "mlp", "gate") if fusion.fusion == "moe" else (fusion.fusion,)
    if "mlp" in experts:
        linear(len(mods) * d_f, 2 * d_f, label="mlp.fc1")
        linear(2 * d_f, d_f, label="mlp.fc2")
    if "gate" in experts:
        for m in mods:
            linear(d_f, d_f, label=f"gate.g.{m}")
        linear(len(mods) * d_f, d_f, label="gate.out")
    if "attention" in experts:
        raise ValueError("no FLOP model for fusion=attention")
    router = 0
    if fusion.fusion == "moe":
        router = 6 * (3 * d_f * fusion.d_r + fusion.d_r * 3)
        parts.append(f"router {3 * d_f}x{fusion.d_r}, {fusion.d_r}x3 per router row")
    return per_row, router, "; ".join(parts)


class FusedRowCount:
    """Counts the fused rows and router rows of the engine's steps (StepRows.fusion_rows)."""

    def __init__(self):
        self.fused = self.router = self.padded = 0

    @contextmanager
    def installed(self):
        from pipeline.federated.engine import client as client_module

        original = client_module.StepRows.fusion_rows

        def counted(step_rows, history):
            rows = original(step_rows, history)
            self.fused += int(rows.ctx.layout.real.sum())
            self.padded += rows.ctx.layout.n_rows  # the bucketed layout's rows, padding included
            self.router += int(rows.history.sum()) if history else int((rows.count > 0).sum())
            return rows

        client_module.StepRows.fusion_rows = counted
        try:
            yield self
        finally:
            client_module.StepRows.fusion_rows = original


# --- capturing the engine's local training -----------------------------------------------------


class LocalTrainingLog:
    """Seconds spent in client.train_clients and what it processed (rows, client-steps)."""

    def __init__(self):
        self.span = Span()
        self.rows = 0
        self.client_steps = 0
        self.calls = 0

    def record(self, span: Span, epochs, result) -> None:
        self.span += span
        self.calls += 1
        self.rows += int(np.asarray(result.rows).sum())
        if epochs:  # batches per epoch of every client x the epochs it actually ran
            self.client_steps += int((np.asarray(epochs[0].n_batches) * np.asarray(result.epochs)).sum())


@contextmanager
def capture_local_training(log: LocalTrainingLog, device: str = "cpu"):
    """Wrap pipeline.federated.engine.shard.train_clients (the engine's local training) to time it."""
    from pipeline.federated.engine import shard as shard_module

    original = shard_module.train_clients

    def wrapped(model, params, working_set, epochs, **kwargs):
        with timed() as span:
            result = original(model, params, working_set, epochs, **kwargs)
            synchronize(device)
        log.record(span, epochs, result)
        return result

    shard_module.train_clients = wrapped
    try:
        yield log
    finally:
        shard_module.train_clients = original


@contextmanager
def oracle_participants_subset(subset_of_round):
    """Make the oracle train only subset_of_round(round_) (timing on a subset of users)."""
    import dataclasses

    from reference import oracle as oracle_module

    original = oracle_module.round_users

    def subset(config, train_counts, round_):
        split = original(config, train_counts, round_)
        return dataclasses.replace(split, arrived=subset_of_round(split.arrived, round_))

    oracle_module.round_users = subset
    try:
        yield
    finally:
        oracle_module.round_users = original


def to_host(state):
    """An oracle DenseState with every tensor in host memory (for the comparison)."""
    from reference.oracle import DenseState

    return DenseState(globals={k: v.cpu() for k, v in state.globals.items()},
                      personal={u: {k: v.cpu() for k, v in mine.items()} for u, mine in state.personal.items()},
                      server=state.server)


# --- the equality check ------------------------------------------------------------------------


def compare_states(cfg, data, negatives, shards, g, oracle_state, block: int = 64) -> dict:
    """Max |engine - oracle| of globals, personal parameters and scores; HR@10 (P1, valid) of both."""
    from pipeline.eval.protocols import evaluate
    from reference.oracle import oracle_scores, oracle_scores_fedmr

    def oracle_block_scores(users: list[int]) -> torch.Tensor:
        if cfg.model.fusion is not None:
            return oracle_scores_fedmr(cfg, data, oracle_state, users)
        return oracle_scores(cfg, oracle_state, users, data.n_items)

    n_items = data.n_items
    items = torch.arange(n_items)
    out = {"globals": {}, "personal": {}, "copies_presence_mismatch": 0}
    for name, value in g.items():
        out["globals"][name] = (value.cpu().double() - oracle_state.globals[name].cpu().double()).abs().max().item()
    score_diff, score_scale = 0.0, 0.0
    for shard in shards:
        store = shard.store
        device = store.device  # the engine's private state lives there
        items_d = items.to(device)
        for start in range(0, len(store.users), block):
            local = torch.arange(start, min(start + block, len(store.users)), device=device)
            users = store.users[local.cpu().numpy()].tolist()
            rows_local, rows_item = local.repeat_interleave(n_items), items_d.repeat(len(local))

            def diff(name, engine_values, oracle_values):
                d = (engine_values.cpu().double() - oracle_values.cpu().double()).abs().max().item()
                out["personal"][name] = max(out["personal"].get(name, 0.0), d)

            for name, tensor in store.dense.items():
                diff(name, tensor[local], torch.stack([oracle_state.personal[u][name] for u in users]))
            for name in store.tables:
                engine_rows = store.table_rows(name, rows_local, rows_item).view(len(local), n_items, -1)
                diff(name, engine_rows, torch.stack([oracle_state.personal[u][name] for u in users]))
            for name in store.copies:
                trained = (store.copy_round[local] >= 0).cpu().numpy()
                in_oracle = np.array([name in oracle_state.personal[u] for u in users])
                out["copies_presence_mismatch"] += int((trained != in_oracle).sum())
                both = np.flatnonzero(trained & in_oracle)
                if both.size:
                    sel = local[torch.as_tensor(both).to(device)]
                    engine_rows = store.copy_rows(name, sel.repeat_interleave(n_items), items_d.repeat(len(sel)),
                                                  g[name].to(device)).view(len(sel), n_items, -1)
                    diff(f"{name} (trained copy)", engine_rows,
                         torch.stack([oracle_state.personal[users[i]][name] for i in both]))
            engine_scores = shard.scores(g, torch.as_tensor(users))
            oracle_block = oracle_block_scores(users)
            score_diff = max(score_diff, (engine_scores.cpu().double() - oracle_block.cpu().double()).abs().max().item())
            score_scale = max(score_scale, oracle_block.abs().max().item())
    out["scores_max_abs_diff"] = score_diff
    out["scores_max_abs"] = score_scale

    ks = (10,)
    results = [s.evaluate(g, "p1", "valid", ks) for s in shards]
    total = sum(count for _, count in results)
    hr_engine = sum(m["hr@10"] * count for m, count in results) / total
    hr_oracle = evaluate(lambda users: oracle_block_scores(users.tolist()), data, "p1",
                         "valid", negatives=negatives, ks=ks)["hr@10"]
    out["hr10_engine"], out["hr10_oracle"] = hr_engine, hr_oracle
    out["hits_engine"], out["hits_oracle"] = round(hr_engine * data.n_users), round(hr_oracle * data.n_users)
    out["hr10_equal"] = out["hits_engine"] == out["hits_oracle"]
    out["params_max_abs_diff"] = max([*out["globals"].values(), *out["personal"].values()])
    return out


# --- one backbone --------------------------------------------------------------------------------


FUSED = "_fedmr"  # a backbone name ending so carries FedMR's fusion module


def dataset_config(dataset: str, synthetic_users: int, synthetic_items: int) -> list[str]:
    """Config overrides of --dataset: MovieLens-100K-MM, or the synthetic generator (no images)."""
    if dataset == "movielens":
        return ["data.name=movielens"]
    return ["data.name=synthetic", f"data.synthetic={{n_users: {synthetic_users}, n_items: {synthetic_items}, "
                                   f"images: false, seed: 0}}"]


def require_feature_store(path: str) -> None:
    """Exit with how to make it when `path` holds no feature store."""
    if not Path(path).is_dir():
        raise SystemExit(f"--features {path}: no feature store there; make it with\n  python -m pipeline "
                         f"encode ../shared/data/movielens-100k-mm --format movielens-mm --out {path}")


def make_config(backbone: str, participation: float, dataset_overrides: list[str], features: str | None = None,
                overrides=()):
    from pipeline.config import load_config

    fusion = []
    if backbone.endswith(FUSED):
        backbone = backbone[:-len(FUSED)]
        fusion = ["model.fusion={}", f"data.features={features}"]  # the project's fusion defaults
    return load_config(None, [*dataset_overrides, f"model.backbone={backbone}", "train.protocol=p1",
                              "train.neg_ratio=4", f"train.participation={participation}", *fusion, *overrides])


def run_backbone(backbone: str, args, data, negatives, participation: float, dataset_overrides, peak) -> dict:
    from pipeline.federated.strategy.aggregate import feature_dims, round_users
    from pipeline.federated.rounds import in_process, run_rounds
    from reference.oracle import initial_dense_state, run_oracle

    # no evaluation scheduled in the timed rounds nor in the --profile round after them
    cfg = make_config(backbone, participation, dataset_overrides, args.features, no_evaluation(args.rounds + 1))
    t = cfg.train
    fusion = cfg.model.fusion
    dims = feature_dims(data) if fusion is not None else None
    # the engine trains a fusion model on any device; the one-client-at-a-time FedMR reference runs
    # on the CPU only, so with a fusion module on a GPU the ratio is the GPU engine against the CPU oracle
    oracle_device = "cpu" if fusion is not None else args.device
    if oracle_device != args.device:
        print(f"{backbone}: the FedMR oracle runs on the CPU; the engine on {args.device}")
    update = cfg.model.pfedrec_update if cfg.model.backbone == "pfedrec" else "joint"
    if fusion is not None:
        print(f"\n== {backbone}: FedMR {fusion.fusion}, d_f {fusion.d_f}, d_r {fusion.d_r}, modalities "
              f"{list(fusion.modalities)} (features {dims}), router {fusion.router_scope}, mixing "
              f"{fusion.mixing_source}, dropout {fusion.dropout}, aggregation {fusion.fusion_agg}")
    print(f"\n== {backbone} (update {update}): dim {cfg.model.dim}, local_epochs {t.local_epochs}, "
          f"neg_ratio {t.neg_ratio}, batch_size {t.batch_size} positives ({t.rows_per_batch()} rows), "
          f"lr {cfg.lr()}, lr_decay {cfg.lr_decay()}, protocol {t.protocol}, participation {t.participation:.4f}")

    with timed() as setup_engine:
        strategy, pools = in_process(cfg, data, negatives, n_pools=args.shards, dtype=torch.float32,
                                     device=args.device)
        shards = pools.pools
    with timed() as setup_oracle:
        state = initial_dense_state(cfg, data.n_users, data.n_items, dims)
    print(f"setup (not timed in the rounds): engine {len(shards)} pool(s) {fmt_s(setup_engine.wall)}, "
          f"oracle dense state {fmt_s(setup_oracle.wall)}")

    with timed() as warm:  # first calls pay one-off costs (lazy imports, allocator): not part of a round
        # a throwaway strategy and pools whose round 0 trains WARMUP_CLIENTS clients
        warm_cfg = make_config(backbone, min(1.0, WARMUP_CLIENTS / data.n_users), dataset_overrides, args.features,
                               no_evaluation(1))
        run_rounds(*in_process(warm_cfg, data, negatives, dtype=torch.float32, device=args.device), rounds=1)
        with oracle_participants_subset(lambda users, round_: users[:WARMUP_CLIENTS]):
            # result discarded; state is not modified
            run_oracle(cfg, data, 1, state=state, dtype=torch.float32, device=oracle_device)
        synchronize(args.device)
    print(f"warm-up ({WARMUP_CLIENTS} clients each side, discarded): {fmt_s(warm.wall)}")

    subset_k = args.oracle_users
    subset_rng = np.random.default_rng([args.seed, 0x5B5E])
    subsets: dict[int, np.ndarray] = {}

    def subset_of_round(users, round_):
        if round_ not in subsets:
            subsets[round_] = np.sort(subset_rng.choice(users, size=min(subset_k, len(users)), replace=False))
        return subsets[round_]

    local_log = LocalTrainingLog()
    fused_rows = FusedRowCount()
    bmm = BmmMeter()
    rounds = []
    for r in range(args.rounds):  # one round per side at a time: the two sides alternate which goes first
        users = round_users(cfg, data.train_counts, r).arrived  # who trains in round r, on both sides

        def engine_round():
            with capture_local_training(local_log, args.device), fused_rows.installed(), bmm, timed() as span:
                [metrics] = run_rounds(strategy, pools, rounds=1)
                synchronize(args.device)
            return span, metrics["train/rows"]

        def oracle_round_timed():
            # the oracle's own loop (run_oracle), round r alone
            nonlocal state
            if subset_k and subset_k < len(users):
                with oracle_participants_subset(subset_of_round), timed() as span:
                    state = run_oracle(cfg, data, 1, state=state, start=r, dtype=torch.float32, device=oracle_device)
                    synchronize(args.device)
                return span, len(subsets[r])
            with timed() as span:
                state = run_oracle(cfg, data, 1, state=state, start=r, dtype=torch.float32, device=oracle_device)
                synchronize(args.device)
            return span, len(users)

        local_before = Span(local_log.span.wall, local_log.span.cpu)
        if r % 2 == 0:  # alternate which side goes first
            (engine, rows), (oracle, oracle_clients) = engine_round(), oracle_round_timed()
        else:
            (oracle, oracle_clients), (engine, rows) = oracle_round_timed(), engine_round()
        scale = len(users) / oracle_clients
        oracle_wall, oracle_cpu = oracle.wall * scale, oracle.cpu * scale
        entry = {"round": r, "clients": len(users), "rows": rows, "engine_s": engine.wall, "engine_cpu_s": engine.cpu,
                 "engine_local_train_s": local_log.span.wall - local_before.wall,
                 "oracle_s": oracle_wall, "oracle_cpu_s": oracle_cpu, "oracle_clients_timed": oracle_clients,
                 "oracle_extrapolated": oracle_clients < len(users),
                 "speedup": oracle_wall / engine.wall, "speedup_cpu": oracle_cpu / max(engine.cpu, 1e-9),
                 "load_1min": loadavg_1min()}
        rounds.append(entry)
        label = (f" [EXTRAPOLATED from {oracle_clients} clients: {oracle.wall:.3f} s x {len(users)}/{oracle_clients}]"
                 if entry["oracle_extrapolated"] else "")
        print(f"round {r}: {len(users)} clients, {rows} training rows | engine {engine.wall:.3f} s wall "
              f"({engine.cpu:.3f} s CPU; local training {entry['engine_local_train_s']:.3f} s) | oracle "
              f"{oracle_wall:.3f} s wall ({oracle_cpu:.3f} s CPU){label} | oracle/engine {entry['speedup']:.2f}x "
              f"wall, {entry['speedup_cpu']:.2f}x CPU | load {entry['load_1min']:.1f}", flush=True)

    engine_total = sum(e["engine_s"] for e in rounds)
    oracle_total = sum(e["oracle_s"] for e in rounds)
    speedup = oracle_total / engine_total
    speedup_cpu = sum(e["oracle_cpu_s"] for e in rounds) / max(sum(e["engine_cpu_s"] for e in rounds), 1e-9)
    if fusion is None:
        per_row, per_step, formula = local_training_flops(backbone, update, cfg.model.dim)
        flops = local_log.rows * per_row + local_log.client_steps * per_step
    else:
        per_row, per_step, formula = fusion_gemm_flops(fusion, cfg.model.id_width(), dims)
        flops = fused_rows.fused * per_row + fused_rows.router * per_step
        formula = (f"fusion GEMMs: {per_row} per fused row x {fused_rows.fused} + {per_step} per router row x "
                   f"{fused_rows.router} [{formula}]")
    gflops = flops / local_log.span.wall / 1e9 if local_log.span.wall > 0 else None
    gflops_cpu = flops / local_log.span.cpu / 1e9 if local_log.span.cpu > 0 else None
    oracle_gflops = flops / oracle_total / 1e9 if not any(e["oracle_extrapolated"] for e in rounds) else None
    print(f"per round (mean of {len(rounds)}): engine {engine_total / len(rounds):.3f} s, oracle "
          f"{oracle_total / len(rounds):.3f} s -> engine is {speedup:.2f}x the oracle's speed "
          f"(wall; {speedup_cpu:.2f}x on CPU time)" + ("" if fusion is not None else
          f"; target >= {TARGET_SPEEDUP:.0f}x: {'MET' if speedup >= TARGET_SPEEDUP else 'NOT MET'}"))
    print(f"local-training FLOPs ({formula}; d = {cfg.model.dim}; {FLOP_CONVENTION}): "
          f"{local_log.rows} rows, {local_log.client_steps} client-steps -> {flops / 1e9:.3f} GFLOP in "
          f"{local_log.span.wall:.3f} s of train_clients = {gflops:.3f} GFLOP/s "
          f"({gflops_cpu:.3f} GFLOP/s on CPU time) = {100 * gflops / peak['gflops']:.3f}% of the GEMM peak "
          f"{peak['gflops']:.1f} GFLOP/s" + (f"; the oracle does the same math at {oracle_gflops:.3f} GFLOP/s"
                                             if oracle_gflops else ""))
    fraction = gflops / peak["gflops"] if gflops else None
    if fusion is not None:
        bmm_rate = bmm.flops / max(bmm.wall, 1e-9) / 1e9
        print(f"torch.bmm + baddbmm run by the engine: {bmm.calls} calls, {bmm.flops / 1e9:.1f} GFLOP in "
              f"{bmm.wall:.2f} s = {bmm_rate:.1f} GFLOP/s ({100 * bmm_rate / peak['gflops']:.0f}% "
              f"of peak), {100 * bmm.wall / max(local_log.span.wall, 1e-9):.0f}% of train_clients' time; "
              f"layout rows {fused_rows.padded} for {fused_rows.fused} fused rows (padding "
              f"{100 * (fused_rows.padded / max(fused_rows.fused, 1) - 1):.1f}%)")
        print(f"local training at >= {100 * FUSION_TARGET_FRACTION:.0f}% of the GEMM peak: "
              f"{'MET' if fraction and fraction >= FUSION_TARGET_FRACTION else 'NOT MET'} ({100 * fraction:.1f}%)")

    result = {"config": {"dim": cfg.model.dim, "local_epochs": t.local_epochs, "neg_ratio": t.neg_ratio,
                         "batch_size": t.batch_size, "rows_per_batch": t.rows_per_batch(), "update": update,
                         "protocol": t.protocol, "participation": t.participation, "lr": cfg.lr()},
              "rounds": rounds, "engine_round_s": engine_total / len(rounds),
              "oracle_round_s": oracle_total / len(rounds), "oracle_device": oracle_device,
              "speedup": speedup, "speedup_cpu": speedup_cpu, "target_met": speedup >= TARGET_SPEEDUP,
              "oracle_extrapolated": any(e["oracle_extrapolated"] for e in rounds),
              "local_train_s": local_log.span.wall, "local_train_cpu_s": local_log.span.cpu,
              "local_train_rows": local_log.rows, "local_train_client_steps": local_log.client_steps,
              "flops_per_row": per_row, "flops_per_client_step": per_step, "flop_formula": formula,
              "local_train_gflop": flops / 1e9, "local_train_gflops": gflops, "local_train_gflops_cpu": gflops_cpu,
              "fraction_of_gemm_peak": fraction, "oracle_gflops": oracle_gflops}
    if fusion is not None:
        result.update(target_met=None, fused_rows=fused_rows.fused, router_rows=fused_rows.router,
                      padded_rows=fused_rows.padded,
                      bmm_gflop=bmm.flops / 1e9, bmm_s=bmm.wall, bmm_calls=bmm.calls,
                      gemm_target_fraction=FUSION_TARGET_FRACTION,
                      gemm_target_met=bool(fraction and fraction >= FUSION_TARGET_FRACTION))

    if result["oracle_extrapolated"]:
        print("equal-metrics check: skipped (the oracle trained only a subset of the participants)")
        result["check"] = None
    else:
        result["check"] = check_equal_metrics(cfg, data, negatives, shards, strategy.globals, to_host(state),
                                              args.rounds)
    if args.profile:
        profile_engine_round(strategy, pools)
    return result


def check_equal_metrics(cfg, data, negatives, shards, g, state, rounds: int) -> dict:
    """compare_states of the engine and the oracle after the rounds, printed."""
    with timed() as span:
        check = compare_states(cfg, data, negatives, shards, g, state)
    print(f"equal metrics after {rounds} round(s) (float32 both sides, {span.wall:.1f} s to check):")
    print("  max |engine - oracle| globals: " + ", ".join(f"{k} {v:.3g}" for k, v in check["globals"].items())
          + "; personal: " + ", ".join(f"{k} {v:.3g}" for k, v in check["personal"].items())
          + (f"; trained-copy presence mismatches {check['copies_presence_mismatch']}"
             if "copies_presence_mismatch" in check and shards[0].store.copies else ""))
    print(f"  scores (all {data.n_users} users x {data.n_items} items): max |diff| {check['scores_max_abs_diff']:.3g} "
          f"(max |score| {check['scores_max_abs']:.3g})")
    print(f"  validation HR@10 (P1): engine {check['hr10_engine']:.6f} ({check['hits_engine']} hits), oracle "
          f"{check['hr10_oracle']:.6f} ({check['hits_oracle']} hits) -> "
          f"{'EQUAL' if check['hr10_equal'] else 'DIFFERENT'}")
    return check


def profile_engine_round(strategy, pools, top: int = 15) -> None:
    """One more engine round (run_rounds) under cProfile and the torch profiler: the top costs, printed."""
    import cProfile
    import io
    import pstats

    from pipeline.federated.rounds import run_rounds

    round_ = strategy.next_round
    profiler = cProfile.Profile()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as ops, timed() as span:
        profiler.enable()
        run_rounds(strategy, pools, rounds=1)
        profiler.disable()
    print(f"profile of engine round {round_} ({span.wall:.3f} s wall under the profilers; the state is "
          f"advanced past the checked rounds):")
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(r"pipeline[/\\]", top)
    print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[-6000:])
    print(ops.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


# --- main ----------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.engine_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"{QUICK_USERS} users per round, 1 round")
    p.add_argument("--backbones", default=",".join(BACKBONES))
    p.add_argument("--rounds", type=int, default=None, help="rounds per backbone (default 2; --quick 1)")
    p.add_argument("--users", type=int, default=None,
                   help="participants per round (participation = users / n_users); default all (--quick 200)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for both sides (default 1: one ClientPool's share, and robust on a shared box)")
    p.add_argument("--shards", type=int, default=1, help="engine pools driven sequentially in-process (default 1)")
    p.add_argument("--oracle-users", type=int, default=0,
                   help="time the oracle on this many random participants per round and extrapolate (0 = all)")
    p.add_argument("--gemm-n", type=int, default=2048)
    p.add_argument("--gemm-repeats", type=int, default=5)
    p.add_argument("--dataset", choices=("movielens", "synthetic"), default="movielens")
    p.add_argument("--synthetic-users", type=int, default=200, help="--dataset synthetic only")
    p.add_argument("--synthetic-items", type=int, default=100, help="--dataset synthetic only")
    p.add_argument("--profile", action="store_true",
                   help="after the check, profile one more engine round per backbone (cProfile + torch profiler); "
                        "the profilers multiply memory (MovieLens FedNCF + FedMR with --quick: 10.7 GB peak RSS "
                        "against 1.8 GB without), so keep to --quick or a small --users")
    p.add_argument("--seed", type=int, default=0, help="seed of the oracle timing subset")
    p.add_argument("--device", default="cpu", help="torch device of both sides' local training (cpu, cuda)")
    p.add_argument("--features", default="runs/features/movielens-100k-mm",
                   help="feature store of the <backbone>_fedmr backbones (made by `python -m pipeline encode`)")
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 2
    if args.users is None and args.quick:
        args.users = QUICK_USERS
    return args


def main(argv=None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from pipeline.data.datasets import open_dataset

    threads = set_threads(args.threads)
    print("bench.engine_speed: the product's rounds (rounds.run_rounds on in-process pools) vs the sequential "
          "oracle (reference.oracle.run_oracle)")
    print(machine_line(threads))
    print(device_line(args.device))
    dataset_overrides = dataset_config(args.dataset, args.synthetic_users, args.synthetic_items)
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    if any(b.endswith(FUSED) for b in backbones):
        require_feature_store(args.features)
    cfg0 = make_config(backbones[0], 1.0, dataset_overrides, args.features)
    with timed() as span:
        data, negatives = open_dataset(cfg0.data)
    counts = data.train_counts
    print(f"dataset {args.dataset}: {data.n_users} users, {data.n_items} items, {int(counts.sum())} training "
          f"positives (per user {counts.min()}..{counts.max()}, median {int(np.median(counts))}); protocol "
          f"k-core {data.stats.get('k_core')}, split {data.stats.get('split')} ({span.wall:.2f} s to prepare)")
    users = data.n_users if args.users is None else min(args.users, data.n_users)
    participation = min(1.0, users / data.n_users)
    print(f"participants per round: {users} (participation {participation:.4f}); rounds {args.rounds}; engine layout: "
          f"{args.shards} in-process pool(s) driven sequentially by rounds.run_rounds (no Ray)")
    peak = gemm_peak_gflops(args.gemm_n, args.gemm_repeats, args.device)
    print(f"GEMM peak: torch.mm {peak['n']}x{peak['n']} float32 on {args.device}, best of {peak['repeats']}: "
          f"{peak['best_seconds']:.4f} s = {peak['gflops']:.1f} GFLOP/s at {threads} thread(s)")

    figures = {"bench": "engine_speed", "quick": bool(args.quick), "threads": threads, "dataset": args.dataset,
               "n_users": data.n_users, "n_items": data.n_items, "train_positives": int(counts.sum()),
               "users_per_round": users, "rounds": args.rounds, "shards": args.shards, "device": args.device,
               "engine_layout": f"{args.shards} in-process pool(s) (rounds.in_process), sequential, no Ray",
               "gemm_peak_gflops": peak["gflops"], "gemm_n": peak["n"], "target_speedup": TARGET_SPEEDUP,
               "backbones": {}}
    for backbone in backbones:
        figures["backbones"][backbone] = run_backbone(backbone, args, data, negatives, participation,
                                                      dataset_overrides, peak)
    figures["peak_rss_gb"] = peak_rss_bytes() / GB
    print("\nsummary (oracle seconds / engine seconds per round, same process, same threads):")
    for backbone, r in figures["backbones"].items():
        check = r.get("check")
        eq = ("n/a" if check is None else
              f"params max|diff| {check['params_max_abs_diff']:.3g}, "
              f"scores max|diff| {check['scores_max_abs_diff']:.3g}, HR@10 "
              f"{'equal' if check['hr10_equal'] else 'DIFFERENT'} "
              f"({check['hr10_engine']:.4f} vs {check['hr10_oracle']:.4f})")
        print(f"  {backbone}: engine {r['engine_round_s']:.3f} s/round, oracle {r['oracle_round_s']:.3f} s/round"
              f"{' (EXTRAPOLATED)' if r['oracle_extrapolated'] else ''} -> {r['speedup']:.2f}x "
              + (f"(target {TARGET_SPEEDUP:.0f}x {'met' if r['target_met'] else 'NOT met'})" if "gemm_target_met" not in r
                 else "") + f"; local training {r['local_train_gflops']:.3f} GFLOP/s = "
              f"{100 * r['fraction_of_gemm_peak']:.3f}% of GEMM peak"
              + (f" (target {100 * FUSION_TARGET_FRACTION:.0f}% {'met' if r['gemm_target_met'] else 'NOT met'})"
                 if "gemm_target_met" in r else "") + f"; {eq}")
    print(f"peak RSS {figures['peak_rss_gb']:.2f} GB")
    emit_json(figures)
    return figures


if __name__ == "__main__":
    main()
