"""What plain PyTorch reaches on FedMR's fusion module, beside the engine, in one process.

    python -m bench.fusion_ceiling            # 3 alternating pairs, 300 engine users, 65536 plain rows
    python -m bench.fusion_ceiling --quick    # 1 pair, 100 engine users, 16384 plain rows

The fusion-speed target of issue #5 asks local training of FedRAP + FedMR to run its GEMM FLOPs
at >= 50% of the machine's measured GEMM peak. This benchmark puts a ceiling beside the
engine's figure: the same module (the project's own `pipeline.models.fusion.experts` and
`router`, project defaults: moe, d_f 64, 3 modalities, dropout 0.1) trained as an ordinary
centralized PyTorch model, the most favourable case there is:

- plain: ONE shared copy of the module (no per-client weights, no buckets, no padding), its
  Linear layers as torch.nn.functional.linear (one GEMM each over all rows), LayerNorm gains and
  biases as broadcast vectors, torch's own dropout (no hashed masks), the router on every 4th row
  (the engine's mixing rows are about a quarter of its fused rows), a BCE loss on z . u and one
  SGD step of every parameter; --rows rows per step, every step timed.
- engine: per pair, one round of FedRAP + FedMR played by rounds.run_rounds (the product's round
  loop) on in-process pools (rounds.in_process; --users sampled clients of MovieLens-100K-MM per
  round, no evaluation scheduled), its local training timed inside client.train_clients as
  bench.engine_speed does and its FLOPs counted from the fused and router rows of its steps.

Both count the same dense GEMM FLOPs per row (bench.engine_speed.fusion_gemm_flops: 6 in out
per Linear, 4 in out for the frozen-feature projections) and are set against the GEMM peak
measured right before them in the same pair (this machine's speed drifts). Pairs alternate
which side runs first. The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np
import torch
import torch.nn.functional as F

from bench._common import emit_json, gemm_peak_gflops, machine_line, no_evaluation, set_threads, timed
from bench.engine_speed import (FUSION_TARGET_FRACTION, FusedRowCount, LocalTrainingLog, capture_local_training,
                                dataset_config, fusion_gemm_flops, make_config, require_feature_store)
from pipeline.models.fusion import GlobalItems, experts, init_params, param_shapes, router

ROUTER_EVERY = 4  # the plain model's mixing rows: every 4th row


class SharedRows(GlobalItems):
    """A FusionContext over R rows that all read ONE shared copy of the module (plain PyTorch):
    fusion.GlobalItems (vector, linear) in training mode. params: name -> leaf tensor;
    features: modality -> [I, width]; items: [R]; dropout: torch's, with probability p."""

    def __init__(self, params: dict[str, torch.Tensor], features: dict[str, torch.Tensor], items: torch.Tensor,
                 dropout: float):
        super().__init__(params, features, items)
        self.p = dropout

    def feature_linear(self, modality: str, name: str) -> torch.Tensor:
        """The rows' features gathered, then projected (per row, as local training does)."""
        return self.linear(self.features[modality].index_select(0, self.items), name)

    def dropout(self, x: torch.Tensor, site: int) -> torch.Tensor:
        return F.dropout(x, self.p, training=True)

    def subset(self, index: torch.Tensor) -> "SharedRows":
        return SharedRows(self.params, self.features, self.items[index], self.p)


class PlainModule:
    """The fusion module as a centralized model on `rows` rows per step (see the module doc)."""

    def __init__(self, fusion_cfg, d_id: int, features: dict[str, torch.Tensor], rows: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        dims = {m: f.shape[1] for m, f in features.items()}
        self.cfg = fusion_cfg
        self.params = {k: v.requires_grad_(True) for k, v in init_params(param_shapes(fusion_cfg, d_id, dims),
                                                                         generator).items()}
        n_items = len(next(iter(features.values())))
        self.items_table = torch.randn(n_items, d_id, generator=generator).mul_(0.1).requires_grad_(True)
        self.user = torch.randn(fusion_cfg.d_f, generator=generator).mul_(0.1).requires_grad_(True)
        self.leaves = [*self.params.values(), self.items_table, self.user]
        self.items = torch.randint(0, n_items, (rows,), generator=generator)
        self.label = (torch.rand(rows, generator=generator) < 0.2).to(torch.float32)
        self.chosen = torch.arange(0, rows, ROUTER_EVERY)
        self.features, self.rows = features, rows

        self.compiled = None

    def loss(self, params: dict[str, torch.Tensor], items_table: torch.Tensor, user: torch.Tensor) -> torch.Tensor:
        ctx = SharedRows(params, self.features, self.items, self.cfg.dropout)
        outputs = experts(ctx, items_table.index_select(0, self.items), self.cfg)
        c = torch.cat([f.index_select(0, self.chosen) for f in outputs], -1)
        alpha = router(ctx.subset(self.chosen), c).mean(0)  # [3]
        z = alpha[0] * outputs[0] + alpha[1] * outputs[1] + alpha[2] * outputs[2]
        return F.binary_cross_entropy_with_logits(z @ user, self.label)

    def step(self, lr: float = 0.01, compiled: bool = False) -> None:
        """One forward, backward and SGD step (compiled: the loss through torch.compile, which
        fuses its elementwise work into generated kernels; the first call compiles)."""
        if compiled and self.compiled is None:
            self.compiled = torch.compile(self.loss)
        loss = (self.compiled if compiled else self.loss)(self.params, self.items_table, self.user)
        grads = torch.autograd.grad(loss, self.leaves)
        with torch.no_grad():
            for leaf, grad in zip(self.leaves, grads):
                leaf.sub_(grad, alpha=lr)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.fusion_ceiling", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 pair, 100 engine users, 16384 plain rows")
    p.add_argument("--pairs", type=int, default=None, help="alternating (plain, engine) pairs (default 3)")
    p.add_argument("--users", type=int, default=None, help="engine clients per round (default 300)")
    p.add_argument("--rows", type=int, default=None, help="plain rows per step (default 65536)")
    p.add_argument("--steps", type=int, default=5, help="plain steps per pair (best and mean are printed)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for both sides")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the plain module's loss through torch.compile (default: yes; --quick: no)")
    p.add_argument("--features", default="runs/features/movielens-100k-mm",
                   help="feature store of MovieLens-100K-MM (made by `python -m pipeline encode`)")
    p.add_argument("--dataset", choices=("movielens", "synthetic"), default="movielens",
                   help="synthetic: the generator with random unit-norm features (text 384, image 1280; for "
                        "a smoke run without a feature store)")
    p.add_argument("--synthetic-users", type=int, default=200, help="--dataset synthetic only")
    p.add_argument("--synthetic-items", type=int, default=100, help="--dataset synthetic only")
    args = p.parse_args(argv)
    args.pairs = args.pairs or (1 if args.quick else 3)
    args.users = args.users or (100 if args.quick else 300)
    args.rows = args.rows or (16384 if args.quick else 65536)
    if args.compile is None:
        args.compile = not args.quick
    return args


def main(argv=None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from pipeline.data.datasets import open_dataset
    from pipeline.federated.strategy.aggregate import feature_dims
    from pipeline.federated.rounds import in_process, run_rounds

    threads = set_threads(args.threads)
    print("bench.fusion_ceiling: FedMR's fusion module as plain centralized PyTorch vs the engine's local training")
    print(machine_line(threads))
    if args.dataset == "movielens":
        require_feature_store(args.features)
    overrides = dataset_config(args.dataset, args.synthetic_users, args.synthetic_items)
    cfg = make_config("fedrap_fedmr", 1.0, overrides, args.features if args.dataset == "movielens" else "null")
    data, negatives = open_dataset(cfg.data)
    if args.dataset == "synthetic":  # random unit-norm features of the embedded encoders' widths
        rng = np.random.default_rng(0)
        unit = [rng.normal(size=(data.n_items, width)) for width in (384, 1280)]
        data = dataclasses.replace(data, features={m: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
                                                   for m, x in zip(("text", "image"), unit)})
    fusion, d_id = cfg.model.fusion, cfg.model.id_width()
    dims = feature_dims(data)
    per_row, per_router_row, formula = fusion_gemm_flops(fusion, d_id, dims)
    print(f"module: {fusion.fusion}, d_f {fusion.d_f}, modalities {list(fusion.modalities)} (features {dims}), "
          f"dropout {fusion.dropout}; dense GEMM FLOPs {per_row} per row + {per_router_row} per router row "
          f"[{formula}]")

    features = {m: torch.as_tensor(np.asarray(data.features[m]), dtype=torch.float32) for m in fusion.modalities
                if m != "id"}
    plain = PlainModule(fusion, d_id, features, args.rows)
    plain_flops = per_row * args.rows + per_router_row * len(plain.chosen)
    features = args.features if args.dataset == "movielens" else "null"
    users = min(args.users, data.n_users)  # sampled clients of every engine round
    engine_cfg = make_config("fedrap_fedmr", users / data.n_users, overrides, features, no_evaluation(args.pairs))
    strategy, pools = in_process(engine_cfg, data, negatives, dtype=torch.float32)
    print(f"plain: {args.rows} rows per step ({len(plain.chosen)} router rows), {plain_flops / 1e9:.2f} GFLOP per "
          f"step; engine: {users} FedRAP + FedMR clients of {args.dataset} per round (rounds.run_rounds)")

    with timed() as warm:  # one-off costs (lazy imports, allocator) on both sides
        plain.step()
        warm_cfg = make_config("fedrap_fedmr", min(1.0, 4 / data.n_users), overrides, features, no_evaluation(1))
        run_rounds(*in_process(warm_cfg, data, negatives, dtype=torch.float32), rounds=1)  # 4 clients, discarded
    print(f"warm-up (discarded): {warm.wall:.2f} s")
    compile_s = None
    if args.compile:
        with timed() as span:
            plain.step(compiled=True)
        compile_s = span.wall
        print(f"torch.compile of the plain module's loss: first step {compile_s:.1f} s (compilation; discarded)")
    sides = ("plain", "engine", *(("compiled",) if args.compile else ()))

    pairs = []
    for pair in range(args.pairs):
        peak = gemm_peak_gflops()["gflops"]
        result = {"peak_gflops": peak}
        for side in (sides if pair % 2 == 0 else sides[::-1]):
            if side in ("plain", "compiled"):
                seconds = []
                for _ in range(args.steps):
                    with timed() as span:
                        plain.step(compiled=side == "compiled")
                    seconds.append(span.wall)
                result.update({f"{side}_best_s": min(seconds), f"{side}_mean_s": float(np.mean(seconds)),
                               f"{side}_gflops": plain_flops / float(np.mean(seconds)) / 1e9})
            else:
                log, count = LocalTrainingLog(), FusedRowCount()
                with capture_local_training(log), count.installed():
                    run_rounds(strategy, pools, rounds=1)  # round `pair` of the run
                flops = per_row * count.fused + per_router_row * count.router
                result.update(engine_s=log.span.wall, engine_gflop=flops / 1e9,
                              engine_gflops=flops / log.span.wall / 1e9, engine_fused_rows=count.fused)
        for side in sides:
            result[f"{side}_fraction"] = result[f"{side}_gflops"] / peak
        result["engine_over_plain"] = result["engine_fraction"] / result["plain_fraction"]
        pairs.append(result)
        compiled = (f" | plain compiled {result['compiled_gflops']:.1f} GFLOP/s ({result['compiled_fraction']:.1%}; "
                    f"step {result['compiled_mean_s'] * 1e3:.0f} ms mean)" if args.compile else "")
        print(f"pair {pair}: GEMM peak {peak:.1f} GFLOP/s | plain {result['plain_gflops']:.1f} GFLOP/s "
              f"({result['plain_fraction']:.1%}; step {result['plain_mean_s'] * 1e3:.0f} ms mean, "
              f"{result['plain_best_s'] * 1e3:.0f} ms best){compiled} | engine {result['engine_gflops']:.1f} GFLOP/s "
              f"({result['engine_fraction']:.1%}; {result['engine_gflop']:.1f} GFLOP in {result['engine_s']:.2f} s) "
              f"| engine / plain {result['engine_over_plain']:.2f}")

    mean = {side: float(np.mean([r[f"{side}_fraction"] for r in pairs])) for side in sides}
    print(f"mean of {len(pairs)} pair(s), fraction of the GEMM peak: plain PyTorch (one shared module) "
          f"{mean['plain']:.1%}"
          + (f", the same through torch.compile {mean['compiled']:.1%}" if args.compile else "")
          + f", the engine (a module per client) {mean['engine']:.1%}: engine / plain "
          f"{mean['engine'] / mean['plain']:.2f}; the {FUSION_TARGET_FRACTION:.0%} target is "
          + ", ".join(f"{'reached' if mean[side] >= FUSION_TARGET_FRACTION else 'NOT reached'} by {side}"
                      for side in sides))
    figures = {"bench": "fusion_ceiling", "quick": args.quick, "dataset": args.dataset, "threads": threads,
               "rows": args.rows, "users": users, "flops_per_row": per_row,
               "flops_per_router_row": per_router_row, "compile_first_step_s": compile_s, "pairs": pairs,
               **{f"{side}_fraction": value for side, value in mean.items()},
               "engine_over_plain": mean["engine"] / mean["plain"], "target_fraction": FUSION_TARGET_FRACTION}
    emit_json(figures)
    return figures


if __name__ == "__main__":
    main()
