"""The results table's note on fusion against its backbone's ID row: per-seed differences."""
from types import SimpleNamespace

import pytest

from pipeline.config import load_config
from pipeline.report.tables import fusion_deltas, learned_row


def _row(config_path, overrides, hits: dict[int, float]):
    config = load_config(config_path, [*overrides, "train.protocol=p1"])

    def run(seed, hr):
        summary = {"selection": {"test": {"hr@10": hr, "ndcg@10": hr / 2}, "valid": {"hr@10": hr},
                                 "best_round": 3}, "rounds_run": 5}
        return SimpleNamespace(spec=SimpleNamespace(seed=seed, config=config, key=config_path or "id",
                                                    centralized=False),
                               summary=summary, status="recorded", error=None, extra={})

    return learned_row([run(seed, hr) for seed, hr in hits.items()], "p1")


def test_fusion_rows_are_compared_with_their_id_row_seed_by_seed():
    ident = _row("configs/synthetic/fcf.yaml", [], {0: 0.60, 1: 0.64, 2: 0.62})
    fused = _row("configs/synthetic/fcf_fedmr.yaml", [], {0: 0.61, 1: 0.66, 2: 0.61})
    # a seed the ID row lacks is left out rather than compared with nothing
    grouped = _row("configs/synthetic_groups/fcf_gfmfr.yaml", [], {0: 0.59, 3: 0.70})
    other = _row("configs/synthetic/fedavg_fedmr.yaml", [], {0: 0.9})  # no FedAvg ID row in the table
    notes = fusion_deltas([ident, fused, grouped, other], "hr@10")
    # differences +1, +2, -1 points: mean +0.67, sample std 1.53, ahead in 2 of the 3 seeds
    assert notes == [f"{fused['label']}: +0.67 ± 1.53 (3 seeds, ahead in 2)",
                     f"{grouped['label']}: -1.00 (1 seed, ahead in 0)"]
    assert grouped["gfmfr"] and not fused["gfmfr"] and "GFMFR" in grouped["label"]


def test_rows_with_other_training_negatives_are_not_paired():
    ident = _row("configs/synthetic/fcf.yaml", ["train.neg_exclude_heldout=true"], {0: 0.60})
    fused = _row("configs/synthetic/fcf_fedmr.yaml", ["train.neg_exclude_heldout=false"], {0: 0.61})
    assert fusion_deltas([ident, fused], "hr@10") == []
    same = _row("configs/synthetic/fcf.yaml", ["train.neg_exclude_heldout=false"], {0: 0.58})
    assert fusion_deltas([ident, fused, same], "hr@10") == [f"{fused['label']}: +3.00 (1 seed, ahead in 1)"]


@pytest.mark.parametrize("missing", ["id", "fusion"])
def test_no_note_without_both_rows(missing):
    ident = _row("configs/synthetic/fcf.yaml", [], {0: 0.60})
    fused = _row("configs/synthetic/fcf_fedmr.yaml", [], {0: 0.61})
    rows = [fused] if missing == "id" else [ident]
    assert fusion_deltas(rows, "hr@10") == []
