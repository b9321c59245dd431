"""Results tables over seeds: mean ± sample std, in Markdown, with the labels a results table needs
requires.

- One table per (dataset version, protocol, selection metric): P1 and P3 never share a table.
- Every table states the protocol, K, the dataset version (k-core, rating threshold, split), the
  encoder, the number of seeds and the selection metric; the report starts with the command that
  made it (an HTML comment).
- Reported test numbers are those at the best-validation round (the run's summary.json).
- On KU the trivial rankings (no learning; exact, computed here on the same prepared split) are
  rows of the P3 table, and the authors' reported ID-only numbers (transcribed from
  FedVLR AAAI-26 poster, Table 1) are a separate, labelled table.
"""

from __future__ import annotations

import math
import statistics
from collections import OrderedDict

from pipeline.report.experiments import RunResult

P1_KS = (10,)
P3_KS = (10, 20, 50)
LEARNED = "re-run (this project)"
CENTRALIZED = "centralized bound (this project, Ray Train)"
TRIVIAL = "trivial (no learning)"
REPORTED = "reported (FedVLR poster, K≈50)"
TRIVIAL_DATASETS = None  # datasets whose tables get the trivial rows; None = every dataset (KU must have them)
TRIVIAL_RANKINGS = ("popularity", "cold-first-then-popularity", "ascending-item-id")
BACKBONE_NAMES = {"fedavg": "FedAvg", "fcf": "FCF", "fedncf": "FedNCF", "pfedrec": "PFedRec", "fedrap": "FedRAP"}

# the FedVLR AAAI-26 poster, Table 1, KU column, plain ID backbones:
# (HR, NDCG) in %, K not stated (most likely 50), P3. Transcribed, not re-run.
REPORTED_KU = OrderedDict([
    ("fedavg", (11.27, 5.62)),
    ("fcf", (22.55, 6.43)),
    ("fedncf", (11.76, 2.49)),
    ("pfedrec", (6.37, 2.30)),
    ("fedrap", (47.06, 10.86)),
])


# The same table's "+ ours" rows: the backbone + FedMR's Sum/MLP/Gate mixture with the router
# (fusion=moe). FCF + ours (55.39 / 15.97) equals the ascending-item-id ranking.
REPORTED_KU_FEDMR = OrderedDict([
    ("fedavg", (54.90, 16.04)),
    ("fcf", (55.39, 15.97)),
    ("fedncf", (43.63, 12.18)),
    ("pfedrec", (45.59, 15.05)),
    ("fedrap", (48.24, 13.05)),
])


def method_label(backbone: str, fusion: str | None = None, gfmfr: bool = False, grouping: str | None = None) -> str:
    """'FCF', 'FCF + FedMR' (fusion=moe), 'FCF + FedMR (mlp)' (another fusion), and ' + GFMFR'
    after either when group-wise fusion is on (' + GFMFR (planted groups)' for the diagnostic
    group_method=planted)."""
    name = BACKBONE_NAMES.get(backbone, backbone)
    if fusion is not None:
        name = f"{name} + FedMR" if fusion == "moe" else f"{name} + FedMR ({fusion})"
    if not gfmfr:
        return name
    return f"{name} + GFMFR (planted groups)" if grouping == "planted" else f"{name} + GFMFR"


def config_label(config) -> str:
    """method_label of an ExperimentConfig."""
    fusion = config.model.fusion.fusion if config.model.fusion is not None else None
    gfmfr = config.model.gfmfr
    return method_label(config.model.backbone, fusion, gfmfr is not None, gfmfr.group_method if gfmfr else None)


def privacy_label(privacy, reports: list[dict | None]) -> str:
    """' (DP: clip 1, sigma 2, epsilon 3.21 at delta 1e-04)': the runs' epsilon after the rounds
    they ran (mean over seeds; 'inf' without noise)."""
    eps = [r["epsilon"] for r in reports if r]
    shown = "inf" if any(math.isinf(e) for e in eps) else (f"{statistics.fmean(eps):.2f}" if eps else "?")
    return (f" (DP: clip {privacy.clip:g}, σ {privacy.noise_multiplier:g}, ε {shown} at δ {privacy.delta:g})")


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof 1; None for a single value)."""
    values = [float(v) for v in values]
    if not values:
        return math.nan, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def format_cell(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    """'mean ± std' (values scaled, e.g. fractions to %); a single value is shown alone."""
    if not values:
        return "–"
    mean, std = mean_std([scale * v for v in values])
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def encoder_of(config: dict, data=None) -> str:
    """The item-content side of a run: 'none (ID only)' without a fusion module; with one, the
    modalities it fuses and, from the prepared dataset the runs used (`data`), each content
    modality's encoder (the feature store's manifest, config data.features) and feature width."""
    fusion = config.get("model", {}).get("fusion")
    if not fusion:
        return "none (ID only)"
    used = list(fusion.get("modalities", ())) if isinstance(fusion, dict) else []
    kind = fusion.get("fusion") if isinstance(fusion, dict) else fusion
    head = f"fusion={kind} over {'+'.join(used) or '?'}"
    features = getattr(data, "features", None) or {}
    if not features:
        return f"{head} (item features of the prepared dataset)"
    store = (config.get("data") or {}).get("features")
    manifest = _store_manifest(store) if store else None
    described = (manifest or {}).get("modalities", {})
    parts = []
    for modality in [m for m in used if m in features] or sorted(features):
        width = int(features[modality].shape[1])
        info = described.get(modality) or {}
        model = info.get("model_id") or info.get("model")
        parts.append(f"{modality}: {model}, {width}-d" if model else f"{modality}: {width}-d")
    if manifest is not None:
        source = f"feature store `{store}`"
    elif store:
        source = f"feature store `{store}`; no readable manifest, so its encoders are not recorded"
    else:
        source = "features shipped with the dataset; their encoders are not recorded"
    return f"{head}; {'; '.join(parts)} ({source})"


def _store_manifest(store) -> dict | None:
    from pipeline.encode.store import read_manifest

    return read_manifest(store)


def protocol_ks(protocol: str) -> tuple[int, ...]:
    return P1_KS if protocol == "p1" else P3_KS


def metric_label(metric: str) -> str:
    """'hr@10' -> 'HR@10', 'coverage@50' -> 'Coverage@50'."""
    name, _, k = metric.partition("@")
    return f"{'Coverage' if name == 'coverage' else name.upper()}@{k}"


# -- grouping ---------------------------------------------------------------------------------

def group_runs(results: list[RunResult]) -> "OrderedDict[tuple, OrderedDict[str, list[RunResult]]]":
    """table key -> row key (config key) -> finished runs (order of the plan).

    Table key: (dataset name, protocol, selection metric); the runs' dataset fingerprints are
    checked against the current preparation when the table is built."""
    tables: OrderedDict = OrderedDict()
    for result in results:
        config = result.spec.config
        fingerprint = result.summary["dataset"]["fingerprint"] if result.summary else None
        table_key = (config.data.name, config.train.protocol, config.train.selection())
        rows = tables.setdefault(table_key, OrderedDict())
        rows.setdefault(result.spec.key, []).append(result)
        if fingerprint is not None:
            result.extra["fingerprint"] = fingerprint
    return tables


def learned_row(runs: list[RunResult], protocol: str) -> dict:
    """One aggregated row: per-metric value lists (fractions) and the run facts."""
    done = [r for r in runs if r.summary is not None]
    config = runs[0].spec.config
    fusion = config.model.fusion.fusion if config.model.fusion is not None else None
    row = {"key": runs[0].spec.key, "backbone": config.model.backbone, "source": LEARNED,
           "label": config_label(config), "fusion": fusion, "gfmfr": config.model.gfmfr is not None,
           "seeds": [r.spec.seed for r in done], "seeds_planned": [r.spec.seed for r in runs],
           "failed": [(r.spec.seed, r.error) for r in runs if r.status == "failed"],
           "missing": [r.spec.seed for r in runs if r.status == "missing"],
           "recorded": [r.spec.seed for r in runs if r.status == "recorded"],
           "derived": [(r.spec.seed, r.summary["derived_from"]["key"]) for r in runs if r.status == "derived"],
           "reencoded": [(r.spec.seed, r.extra["reencoded_from"]) for r in runs if r.extra.get("reencoded_from")],
           "test": {}, "valid": {}, "best_round": [], "rounds_run": [], "seconds": [],
           "timing": []}
    if config.privacy is not None:
        row["label"] += privacy_label(config.privacy, [r.summary.get("privacy") for r in done])
    if config.train.neg_exclude_heldout:
        row["label"] += " (original negatives: optimistic)"
    row["negatives"] = config.train.negatives_label()
    row["centralized"] = runs[0].spec.centralized
    row["private"] = config.privacy is not None
    if row["centralized"]:
        row["label"] += " (centralized)"
        row["source"] = CENTRALIZED
    metric = config.train.selection()
    # MRR and coverage: only where every seed measured them (runs from before they were measured
    # lack them; a mean over some seeds would pass for a mean over all)
    measured = set.intersection(*(set(run.summary["selection"]["test"]) for run in done)) if done else set()
    for run in done:
        selection = run.summary["selection"]
        for k in protocol_ks(protocol):
            for name in ("hr", "ndcg", "mrr", "coverage"):
                column = f"{name}@{k}"
                if column in measured:
                    row["test"].setdefault(column, []).append(selection["test"][column])
        row["valid"].setdefault(metric, []).append(selection["valid"][metric])
        row["best_round"].append(selection["best_round"])
        row["rounds_run"].append(run.summary.get("rounds_run"))
        row["seconds"].append(run.summary.get("seconds_total"))
        row["timing"].append(run.summary.get("timing"))  # None in summaries from before it existed
    row["per_seed"] = {r.spec.seed: {**{f"test/{c}": r.summary["selection"]["test"][c] for c in row["test"]},
                                     f"valid/{metric}": r.summary["selection"]["valid"][metric],
                                     "best_round": r.summary["selection"]["best_round"],
                                     "rounds_run": r.summary.get("rounds_run")} for r in done}
    return row


def display_names(results: list[RunResult]) -> dict[str, str]:
    """config key -> the name its row has in the tables ('FCF + FedMR', with the DP and
    centralized suffixes), for legends; keys whose names would collide keep their key beside it."""
    by_key: OrderedDict[str, list[RunResult]] = OrderedDict()
    for result in results:
        by_key.setdefault(result.spec.key, []).append(result)
    names = {key: learned_row(runs, runs[0].spec.config.train.protocol)["label"] for key, runs in by_key.items()}
    counts = {}
    for name in names.values():
        counts[name] = counts.get(name, 0) + 1
    return {key: name if counts[name] == 1 else f"{name} [{key}]" for key, name in names.items()}


# -- dataset facts and baselines -----------------------------------------------------------------

def time_split(timings: list[dict | None]) -> str:
    """' Of which ...': start-up, training, evaluation and checkpoints over the runs whose summary
    has a timing block ('' when none has)."""
    found = [t for t in timings if t]
    if not found:
        return ""
    minutes = {key: sum(t.get(f"{key}_s") or 0.0 for t in found) / 60
               for key in ("startup", "train", "eval", "checkpoint")}
    return (f" Of the {len(found)} runs that record it: start-up {minutes['startup']:.1f} min, training "
            f"{minutes['train']:.1f} min, evaluation {minutes['eval']:.1f} min, checkpoints "
            f"{minutes['checkpoint']:.1f} min (the last invocation's start-up only, for a resumed run).")


def dataset_facts(config) -> tuple[dict, object, object]:
    """(facts, data, negatives) of the prepared split the runs used (the train job's cache)."""
    import numpy as np

    from pipeline.data.datasets import open_dataset
    from pipeline.data.cache import data_cache_root

    data, negatives = open_dataset(config.data, cache=data_cache_root())
    popularity = data.item_popularity()
    item_total = popularity + np.bincount(data.valid_item, minlength=data.n_items) \
        + np.bincount(data.test_item, minlength=data.n_items)
    facts = {
        "name": data.name, "users": data.n_users, "items": data.n_items,
        "train": int(data.train_indptr[-1]), "split": data.stats.get("split"),
        "k_core": data.stats.get("k_core"), "rating_threshold": config.data.protocol.rating_threshold,
        "min_per_user": int(data.train_counts.min()) + 2, "min_per_item": int(item_total.min()),
        "fingerprint": data.fingerprint(), "eval_seed": negatives.seed,
        "cold_test_users": int((popularity[data.test_item] == 0).sum()),
        "cold_items": int((popularity == 0).sum()),
    }
    return facts, data, negatives


POPULARITY_LINE = "popularity (no learning)"


def popularity_reference(config, metric: str, fingerprint: str | None = None) -> dict[str, float]:
    """{POPULARITY_LINE: the popularity ranking's value of `metric` ('valid/hr@10')}, on the
    prepared split `config`'s runs used (the train job's cache) under its protocol: exact, no
    seed, one scoring pass over the validation users. ValueError when the data `config` prepares
    today is not the runs' (`fingerprint`, from their summaries)."""
    from pipeline.eval.baselines import evaluate_baselines

    split, _, column = metric.rpartition("/")
    facts, data, negatives = dataset_facts(config)
    if fingerprint is not None and facts["fingerprint"] != fingerprint:
        raise ValueError(f"the runs were made on the preparation {fingerprint}; their config prepares "
                         f"{facts['fingerprint']} today")
    k = int(column.partition("@")[2])
    rows = evaluate_baselines(data, negatives, names=("popularity",), protocols=(config.train.protocol,), ks=(k,))
    value = next(row[column] for row in rows if row["split"] == (split or "valid"))
    return {POPULARITY_LINE: float(value)}


def trivial_rows(data, negatives, protocol: str) -> list[dict]:
    """The trivial rankings on the test split (exact, no seed)."""
    from pipeline.eval.baselines import evaluate_baselines

    rows = evaluate_baselines(data, negatives, names=TRIVIAL_RANKINGS, protocols=(protocol,),
                              ks=protocol_ks(protocol))
    return [{"backbone": row["method"], "label": row["method"], "source": TRIVIAL,
             "test": {k: [v] for k, v in row.items() if "@" in k}} for row in rows if row["split"] == "test"]


# -- rendering --------------------------------------------------------------------------------------

def _k_core_text(facts: dict, config) -> str:
    k_core = facts["k_core"]
    if isinstance(k_core, (list, tuple)):
        core = f"k-core: users ≥ {k_core[0]}, items ≥ {k_core[1]} interactions"
    else:
        core = f"k-core {k_core}"
    threshold = facts["rating_threshold"]
    threshold = "none (all ratings kept)" if threshold is None else f"ratings ≥ {threshold}"
    return (f"{core} (observed minimum: {facts['min_per_user']} interactions per user, "
            f"{facts['min_per_item']} per item); rating threshold: {threshold}; split: {facts['split']}")


def _uniform(values, fmt=str) -> str:
    distinct = list(OrderedDict.fromkeys(values))
    return fmt(distinct[0]) if len(distinct) == 1 else "varies: " + ", ".join(fmt(v) for v in distinct)


def centralized_gaps(rows: list[dict], metric: str) -> list[str]:
    """'FCF: 27.78 vs 38.24 (−10.46, 73 %)' for every federated row (without DP) with a centralized
    row of the same backbone and fusion (a + GFMFR row is read against its backbone's + FedMR bound)."""
    bounds = {(r["backbone"], r["fusion"]): r for r in rows if r.get("centralized") and r["test"].get(metric)}
    gaps = []
    for row in rows:
        bound = bounds.get((row.get("backbone"), row.get("fusion")))
        if row["source"] != LEARNED or row.get("private") or bound is None or not row["test"].get(metric):
            continue
        federated, pooled = statistics.fmean(row["test"][metric]), statistics.fmean(bound["test"][metric])
        share = f", {100 * federated / pooled:.0f} %" if pooled > 0 else ""
        gaps.append(f"{row['label']}: {100 * federated:.2f} vs {100 * pooled:.2f} "
                    f"({100 * (federated - pooled):+.2f}{share})")
    return gaps


def fusion_deltas(rows: list[dict], metric: str) -> list[str]:
    """'FCF + FedMR: +1.09 ± 0.71 (3 seeds, ahead in 3)' for every federated row with a fusion
    module or GFMFR that has its backbone's ID-only row (same training negatives, no DP) in the
    table: the per-seed difference fusion − ID on the seeds both finished, its mean and sample std."""
    plain = {(r["backbone"], r.get("negatives")): r for r in rows
             if r["source"] == LEARNED and not r.get("private") and not r.get("fusion") and not r.get("gfmfr")}
    column, deltas = f"test/{metric}", []
    for row in rows:
        base = plain.get((row.get("backbone"), row.get("negatives")))
        fused = row.get("fusion") or row.get("gfmfr")
        if row["source"] != LEARNED or row.get("private") or base is None or not fused:
            continue
        seeds = [s for s in row["per_seed"] if column in row["per_seed"][s] and column in base["per_seed"].get(s, {})]
        if not seeds:
            continue
        diffs = [100 * (row["per_seed"][s][column] - base["per_seed"][s][column]) for s in seeds]
        mean, std = mean_std(diffs)
        spread = f" ± {std:.2f}" if std is not None else ""
        deltas.append(f"{row['label']}: {mean:+.2f}{spread} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''}, "
                      f"ahead in {sum(d > 0 for d in diffs)})")
    return deltas


def is_learned(row: dict) -> bool:
    """A row this project trained (federated or its centralized bound), not a trivial or reported one."""
    return row["source"] in (LEARNED, CENTRALIZED)


def render_table(rows: list[dict], protocol: str, metric: str) -> str:
    ks = protocol_ks(protocol)
    # MRR and coverage columns only where a trained run measured them (records from before they were
    # measured have none, and their tables rebuild as they were)
    columns = [f"{name}@{k}" for k in ks for name in ("hr", "ndcg", "mrr", "coverage")
               if name in ("hr", "ndcg") or any(is_learned(row) and row["test"].get(f"{name}@{k}") for row in rows)]
    header = ["Method", "Source", *(f"test {metric_label(c)}" for c in columns),
              f"valid {metric_label(metric)}", "best round (mean)", "rounds run (mean)", "seeds"]
    if any(row.get("centralized") for row in rows):  # centralized rows count epochs
        header[-3:-1] = ["best round / epoch (mean)", "rounds / epochs run (mean)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        learned = is_learned(row)
        cells = [row["label"], row["source"]]
        cells += [format_cell(row["test"].get(c, [])) for c in columns]
        if learned:
            cells.append(format_cell(row["valid"].get(metric, [])))
            cells.append(f"{statistics.fmean(row['best_round']):.1f}" if row["best_round"] else "–")
            cells.append(f"{statistics.fmean(row['rounds_run']):.1f}" if row["rounds_run"] else "–")
            seeds = len(row["seeds"])
            cells.append(str(seeds) if seeds == len(row["seeds_planned"]) else f"{seeds} of {len(row['seeds_planned'])}")
        else:
            cells += ["–", "–", "–", "exact (no seed)"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_reported_ku(with_fedmr: bool = False) -> str:
    """The poster's KU rows: plain backbones, and their "+ ours" (FedMR) rows when asked."""
    lines = ["| Method | Source | HR (K≈50) | NDCG (K≈50) |", "|---|---|---|---|"]
    for backbone, (hr, ndcg) in REPORTED_KU.items():
        lines.append(f"| {method_label(backbone)} | {REPORTED} | {hr:.2f} | {ndcg:.2f} |")
        if with_fedmr:
            hr, ndcg = REPORTED_KU_FEDMR[backbone]
            lines.append(f"| {method_label(backbone, 'moe')} | {REPORTED} (\"+ ours\") | {hr:.2f} | {ndcg:.2f} |")
    return "\n".join(lines)


PROTOCOL_TITLES = {"p1": "P1: held-out item among 99 sampled negatives (HR/NDCG@10)",
                   "p3": "P3: full ranking, training items masked (HR = Recall; @10/20/50)"}


def _override_changes(results: list[RunResult], overrides: list[str]) -> str:
    """' Changed from the config files: train.rounds 100 → 15.' for overrides of non-runtime keys."""
    from pipeline.config import load_config

    changes = []
    sources = list(OrderedDict.fromkeys(r.spec.source for r in results))
    for item in overrides:
        key, _, _ = item.partition("=")
        key = key.strip()
        if key.startswith("runtime."):
            continue
        own, new = set(), set()
        for source in sources:
            for config, bucket in ((load_config(source), own), (load_config(source, [item]), new)):
                value = config
                for part in key.split("."):
                    value = getattr(value, part, None)
                bucket.add(str(value))
        if own != new:
            changes.append(f"{key} {'/'.join(sorted(own))} → {'/'.join(sorted(new))}")
    return (" Changed from the config files: " + "; ".join(changes) + ".") if changes else ""


DEFAULT_TITLE = "Federated backbones: test metrics at the best-validation round"


def build_report(results: list[RunResult], title: str | None = None, command: str = "",
                 overrides: list[str] = (), seeds=(), extra_notes: list[str] = (),
                 figures: list[tuple[str, str]] = ()) -> dict:
    """{'markdown': str, 'tables': [...], 'runs': [...]} for the finished and failed runs.
    `figures`: (alt text, path relative to the Markdown file) images shown after the notes."""
    parts = []
    if command:
        parts.append(f"<!-- made by: {command} -->")
    parts += [f"# {title or DEFAULT_TITLE}", ""]
    parts.append("Values in %, mean ± sample standard deviation over run seeds. Each run's test metrics are "
                 "taken at its best-validation round (selection on validation only, strictly-better rule, "
                 "early stopping on the same metric). A seed s sets both "
                 "`train.seed` and `train.model_seed` to s; the P1 evaluation negatives stay fixed "
                 "(`data.eval_seed`). Ties are ranked pessimistically (an item tied with the target ranks above it).")
    if overrides:
        parts.append("")
        parts.append("Overrides applied to every config: " + ", ".join(f"`{o}`" for o in overrides) + "."
                     + _override_changes(results, overrides))
    for note in extra_notes or ():
        parts += ["", f"**Note:** {note}"]
    for alt, link in figures or ():
        parts += ["", f"![{alt}]({link})"]
    tables_json, rows_json = [], []
    for (dataset, protocol, metric), row_runs in group_runs(results).items():
        all_runs = [run for runs in row_runs.values() for run in runs]
        configs = [runs[0].spec.config for runs in row_runs.values()]
        try:
            facts, data, negatives = dataset_facts(configs[0])
        except Exception as error:  # the table still lists its runs and their failures
            facts, data, negatives = None, None, None
            facts_error = f"{type(error).__name__}: {error}"
        if facts is not None:
            fingerprints = {run.extra.get("fingerprint") for run in all_runs} - {None}
            if fingerprints - {facts["fingerprint"]}:
                raise ValueError(f"{dataset}: runs were made on another preparation of the data "
                                 f"({sorted(fingerprints)} vs {facts['fingerprint']}); re-run with --force")
        rows = [learned_row(runs, protocol) for runs in row_runs.values()]
        if facts is None:
            parts += ["", f"## {dataset} — {PROTOCOL_TITLES[protocol]}", "",
                      f"- **Dataset could not be prepared:** {facts_error}", "", render_table(rows, protocol, metric)]
            parts += [f"- FAILED: {row['key']} seed {seed}: {error}" for row in rows for seed, error in row["failed"]]
            continue
        if TRIVIAL_DATASETS is None or dataset in TRIVIAL_DATASETS:
            rows += trivial_rows(data, negatives, protocol)
        train = [c.train for c in configs]
        encoders = [encoder_of(c.model_dump(), data) for c in configs]
        planned_seeds = sorted({run.spec.seed for run in all_runs})
        done_counts = sorted({len(r["seeds"]) for r in rows if is_learned(r)})
        ks = protocol_ks(protocol)
        parts += ["", f"## {facts['name']} — {PROTOCOL_TITLES[protocol]}", ""]
        parts.append(f"- **Protocol:** {protocol.upper()}; K = {', '.join(map(str, ks))}; "
                     f"selection metric: validation {metric_label(metric)}, test reported at the best-validation round")
        parts.append(f"- **Dataset:** `{facts['name']}` — {facts['users']} users, {facts['items']} items, "
                     f"{facts['train']} training interactions + 1 validation and 1 test item per user; "
                     f"{_k_core_text(facts, configs[0])}; fingerprint `{facts['fingerprint']}`"
                     + (f"; P1 negatives seed {facts['eval_seed']}" if protocol == "p1" else ""))
        parts.append(f"- **Encoder:** {_uniform(encoders)}")
        parts.append(f"- **Seeds:** {len(planned_seeds)} ({', '.join(map(str, planned_seeds))}); "
                     f"seed s sets train.seed = train.model_seed = s"
                     + ("" if done_counts == [len(planned_seeds)] else
                        " — **some runs did not finish**: rows show how many seeds they average"))
        parts.append(f"- **Schedule:** rounds cap {_uniform([t.rounds for t in train])}, patience "
                     f"{_uniform([t.patience for t in train])}, participation {_uniform([t.participation for t in train])}, "
                     f"local epochs {_uniform([t.local_epochs for t in train])}, neg_ratio "
                     f"{_uniform([t.neg_ratio for t in train])}, training negatives: "
                     f"{_uniform([t.negatives_label() for t in train])}; per-backbone defaults otherwise "
                     f"(configs: {', '.join(sorted({str(r.spec.source) for r in all_runs}))})")
        central = [c.centralized for r, c in zip(row_runs.values(), configs) if r[0].spec.centralized]
        if central:
            parts.append(f"- **Centralized rows:** the same model (backbone, + FedMR) trained on all users' pooled "
                         f"training data with Ray Train (`pipeline centralized`): the same negatives rule, evaluator and "
                         f"validation-based selection; Adam (SparseAdam for the per-user tables), lr "
                         f"{_uniform([c.lr for c in central])}, {_uniform([c.batch_size for c in central])} positives per "
                         f"batch, epochs cap {_uniform([c.epochs for c in central])}, patience "
                         f"{_uniform([c.patience for c in central])}, {_uniform([c.workers for c in central])} worker(s). "
                         f"FedAvg, FCF and PFedRec share one pooled model (global Q, per-user head): they differ only "
                         f"in federated update rules")
        parts += ["", render_table(rows, protocol, metric)]
        notes = []
        gaps = centralized_gaps(rows, metric)
        if gaps:
            notes.append(f"Federated-to-centralized gap (test {metric_label(metric)}, means over seeds; federated − "
                         f"centralized, and the share of the bound the federated model reaches): " + "; ".join(gaps) + ".")
        deltas = fusion_deltas(rows, metric)
        if deltas:
            notes.append(f"Fusion against its backbone's ID row (test {metric_label(metric)}, points; per seed the "
                         f"difference fusion − ID, then its mean ± sample std over the seeds both rows finished, and in "
                         f"how many the fusion row is ahead): " + "; ".join(deltas) + ".")
        if TRIVIAL_DATASETS is None or dataset in TRIVIAL_DATASETS:
            trivial = [r for r in rows if r["source"] == TRIVIAL]
            learned = [r for r in rows if is_learned(r) and r["test"].get(metric)]
            notes.append(f"Trivial rows: the same prepared split and evaluator, test split, {protocol.upper()}, "
                         f"no learning and no seed (exact).")
            if facts["cold_test_users"]:
                notes.append(f"{facts['cold_test_users']} of {facts['users']} test users "
                             f"({100 * facts['cold_test_users'] / facts['users']:.1f} %) hold an item that never occurs "
                             f"in training ({facts['cold_items']} such items): an ID-only model never trains those "
                             f"rows, while `cold-first-then-popularity` ranks them first"
                             + (f" (tied among themselves; ties count against the target, so under P3 each sits at "
                                f"rank {facts['cold_items']})." if protocol == "p3" else "."))
            for ranking in trivial:
                value = ranking["test"][metric][0]
                beaten = [r["label"] for r in learned
                          if statistics.fmean(r["test"][metric]) > value]
                losing = [r["label"] for r in learned
                          if statistics.fmean(r["test"][metric]) <= value]
                notes.append(f"Against `{ranking['backbone']}` (test {metric_label(metric)} {100 * value:.2f}): "
                             f"learned rows above it (mean): {', '.join(beaten) or 'none'}; at or below it: "
                             f"{', '.join(losing) or 'none'}.")
        per_seed = []
        for row in rows:
            if is_learned(row) and row["per_seed"]:
                per_seed.append(f"{row['label']}: " + ", ".join(
                    f"s{seed} {info['best_round']}/{info['rounds_run']} ({100 * info[f'test/{metric}']:.2f})"
                    for seed, info in row["per_seed"].items()))
        seconds = [x for r in rows if is_learned(r) for x in r["seconds"] if x is not None]
        if seconds:
            notes.append(f"Run time: {len(seconds)} runs, {sum(seconds) / 60:.1f} min in all "
                         f"(wall clock of each train job, one after another, on a shared machine: timings are noisy)."
                         + time_split([t for r in rows if is_learned(r) for t in r.get("timing", [])]))
        recorded = sum(len(row.get("recorded", [])) for row in rows)
        if recorded:
            notes.append(f"{recorded} of these runs were read from their records (finished earlier, perhaps on "
                         f"another machine; the records folder is in the command above): "
                         + ", ".join(f"{row['key']} seed {'/'.join(map(str, row['recorded']))}"
                                     for row in rows if row.get("recorded")) + ".")
        derived = [f"{row['key']} seed {seed} (from {twin})" for row in rows for seed, twin in row.get("derived", [])]
        if derived:
            notes.append(f"{len(derived)} of these runs were read from runs of the same config and seed trained "
                         f"under another protocol that also evaluated this one (`--shared-runs`, "
                         f"train.also_protocols: the same training, so the numbers such a run gives): "
                         + ", ".join(derived) + ".")
        by_features: dict[str, list[str]] = {}  # features fingerprint -> the runs made on it
        for row in rows:
            for seed, made in row.get("reencoded", []):
                by_features.setdefault(made, []).append(f"{row['key']} seed {seed}")
        if by_features:
            today = sorted({run.summary["dataset"]["features"] for run in all_runs
                            if run.summary and not run.extra.get("reencoded_from")
                            and run.summary["dataset"].get("features")})
            notes.append(f"{sum(map(len, by_features.values()))} of these runs were made on another encoding of the "
                         f"same item feature store (the same encoders, settings and inputs, encoded again on another "
                         f"machine, whose float kernels round differently; `--accept-reencoded-features`): "
                         + "; ".join(f"on features {made}: " + ", ".join(runs)
                                     for made, runs in sorted(by_features.items()))
                         + (f"; the other runs' features: {', '.join(today)}." if today else "."))
        if per_seed:
            notes.append(f"Per seed — best round / rounds run (test {metric_label(metric)} at the best round): "
                         + "; ".join(per_seed) + ".")
        for row in rows:
            for seed, error in row.get("failed", []):
                notes.append(f"FAILED: {row['key']} seed {seed}: {error}")
        missing = [f"{row['key']} seed {'/'.join(map(str, row['missing']))}" for row in rows if row.get("missing")]
        if missing:
            notes.append("Not run (yet; the command resumes them): " + ", ".join(missing)
                         + ". Rows average the seeds that finished.")
        if notes:
            parts += [""] + [f"- {note}" for note in notes]
        if dataset == "ku" and protocol == "p3":
            parts += ["", f"### {facts['name']} — {REPORTED} (transcribed, not re-run)", "",
                      "- Transcribed from the FedVLR AAAI-26 poster (Table 1, KU column, "
                      "plain ID backbones and, beside runs with a fusion module, their \"+ ours\" rows = "
                      "+ FedMR with fusion=moe). P3; K not stated in the poster (most likely 50); the authors' "
                      "hyper-parameters were chosen by test-upon-best-validation and their personal parameters are "
                      "never restored at evaluation, so these are not targets to match.",
                      "- Compare them with the HR@50 / NDCG@50 columns above only with these labels in view.",
                      "", render_reported_ku(with_fedmr=any(r.get("fusion") for r in rows))]
        tables_json.append({"dataset": facts, "protocol": protocol, "selection_metric": metric, "ks": list(ks),
                            "encoder": _uniform(encoders), "seeds": planned_seeds,
                            "rows": [{k: v for k, v in r.items()} for r in rows]})
    for result in results:
        rows_json.append({"key": result.spec.key, "seed": result.spec.seed, "status": result.status,
                          "run_dir": str(result.spec.run_dir), "error": result.error,
                          "selection": result.summary["selection"] if result.summary else None,
                          "reencoded_from": result.extra.get("reencoded_from"),
                          "rounds_run": result.summary.get("rounds_run") if result.summary else None})
    return {"markdown": "\n".join(parts), "tables": tables_json, "runs": rows_json,
            "reported_ku": {k: {"hr": v[0], "ndcg": v[1], "label": REPORTED} for k, v in REPORTED_KU.items()}}
