"""Smoke test of the engine benchmarks: both run end to end at tiny sizes through main(argv) and
end with one JSON line holding the expected keys. No timing is asserted (benchmarks are not
tests); the tiny data is synthetic, so no dataset files are needed."""

from __future__ import annotations

import json

import pytest
import torch

from bench import engine_speed, fusion_ceiling, gfmfr_server, scale, scale_eval
from pipeline.data.datasets import data_root


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def last_json_line(text: str) -> dict:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert lines, "no output"
    figures = json.loads(lines[-1])
    assert isinstance(figures, dict)
    assert sum(1 for line in lines if line.lstrip().startswith("{")) == 1, "exactly one JSON line"
    return figures


def test_engine_speed_smoke(capsys):
    returned = engine_speed.main(["--quick", "--dataset", "synthetic", "--synthetic-users", "40",
                                  "--synthetic-items", "30", "--users", "12", "--rounds", "2",
                                  "--gemm-n", "64", "--gemm-repeats", "2"])
    figures = last_json_line(capsys.readouterr().out)
    assert figures["bench"] == "engine_speed" == returned["bench"]
    for key in ("threads", "users_per_round", "rounds", "shards", "gemm_peak_gflops", "target_speedup", "backbones"):
        assert key in figures, key
    assert set(figures["backbones"]) == {"pfedrec", "fedrap"}
    for backbone, result in figures["backbones"].items():
        for key in ("engine_round_s", "oracle_round_s", "speedup", "speedup_cpu", "target_met", "oracle_extrapolated",
                    "local_train_s", "local_train_gflop", "local_train_gflops", "fraction_of_gemm_peak",
                    "flop_formula", "rounds", "check"):
            assert key in result, (backbone, key)
        assert len(result["rounds"]) == 2
        check = result["check"]
        for key in ("params_max_abs_diff", "scores_max_abs_diff", "hr10_engine", "hr10_oracle", "hr10_equal"):
            assert key in check, (backbone, key)
        # the rounds the benchmark timed (rounds.run_rounds on in-process pools) are the oracle's rounds
        assert check["hr10_equal"] and check["params_max_abs_diff"] < 1e-4, (backbone, check)
        assert [r["clients"] for r in result["rounds"]] == [12, 12]


def test_engine_speed_oracle_subset_smoke(capsys):
    engine_speed.main(["--quick", "--dataset", "synthetic", "--synthetic-users", "40", "--synthetic-items", "30",
                       "--users", "12", "--oracle-users", "3", "--backbones", "fedrap", "--gemm-n", "64",
                       "--gemm-repeats", "1"])
    result = last_json_line(capsys.readouterr().out)["backbones"]["fedrap"]
    assert result["oracle_extrapolated"] is True and result["check"] is None


def test_fusion_ceiling_smoke(capsys):
    returned = fusion_ceiling.main(["--quick", "--dataset", "synthetic", "--synthetic-users", "30",
                                    "--synthetic-items", "40", "--users", "12", "--rows", "512", "--steps", "2",
                                    "--pairs", "2"])
    figures = last_json_line(capsys.readouterr().out)
    assert figures["bench"] == "fusion_ceiling" == returned["bench"]
    assert len(figures["pairs"]) == 2
    for pair in figures["pairs"]:
        for key in ("peak_gflops", "plain_gflops", "plain_fraction", "engine_gflops", "engine_fraction",
                    "engine_over_plain", "engine_fused_rows"):
            assert pair[key] > 0, key
    assert figures["flops_per_row"] > 0 and figures["target_fraction"] == 0.5


def test_scale_smoke(capsys):
    returned = scale.main(["--population", "1500", "--per-round", "60", "--items", "120", "--rounds", "1",
                           "--score-sample", "20"])
    figures = last_json_line(capsys.readouterr().out)
    assert figures["bench"] == "scale" == returned["bench"]
    for key in ("threads", "backbone", "data", "settings", "ratio_small_pop_over_main", "ratio_double_over_main",
                "process_peak_rss_gb", "rss_limit_gb", "rss_pass"):
        assert key in figures, key
    assert set(figures["settings"]) == {"main", "small_pop", "double"}
    for name, setting in figures["settings"].items():
        for key in ("population", "per_round", "s_per_round", "round_seconds", "peak_rss_gb", "store_mb", "stopped"):
            assert key in setting, (name, key)
        assert setting["rounds_run"] == 2  # one warm-up + one timed
        # every sampled client arrives (no dropout) and trains in each round the loop played
        assert setting["round_clients"] == [setting["per_round"]] * 2, (name, setting["round_clients"])


def test_scale_eval_smoke(capsys):
    returned = scale_eval.main(["--users", "300", "--items", "120", "--train-users", "50", "--baseline-users", "100",
                                "--fedmr", "--text-width", "16", "--fedmr-block-clients", "64",
                                "--fedmr-baseline-users", "30"])
    figures = last_json_line(capsys.readouterr().out)
    assert figures["bench"] == "scale_eval" == returned["bench"]
    for key in ("users", "items", "eval_s_p1", "eval_s_p3", "baseline_eval_s_p1", "baseline_eval_s_p3",
                "speedup_p1", "speedup_p3", "baseline_users", "baseline_measured"):
        assert key in figures, key
    assert figures["baseline_users"] == 100 and not figures["baseline_measured"]
    # the two scorers rank the sample's held-out items the same (float32: at most one user's
    # near-tie may fall the other way on another CPU's kernels)
    assert figures["max_metric_diff_p1"] <= 1 / 100 and figures["max_metric_diff_p3"] <= 1 / 100
    assert figures["fedmr_baseline_users"] == 30 and figures["text_width"] == 16
    assert figures["fedmr_max_metric_diff_p1"] <= 1 / 30 and figures["fedmr_max_metric_diff_p3"] <= 1 / 30
    assert figures["fedmr_eval_s_p3"] > 0 and figures["fedmr_eval_s_p1"] > 0
    # FedMR trains one round on every user, in blocks of 64 clients here
    assert figures["fedmr_train_users"] == figures["users"] and figures["fedmr_train_block_clients"] == 64
    assert figures["fedmr_round_s"] > 0 and figures["fedmr_peak_rss_gb"] > 0


@pytest.mark.realdata
@pytest.mark.skipif(not (data_root() / "ku").is_dir(), reason="KU data not available")
def test_gfmfr_server_smoke(capsys):
    returned = gfmfr_server.main(["--quick", "--regroup-every", "3"])
    figures = last_json_line(capsys.readouterr().out)
    assert figures["benchmark"] == "gfmfr_server" == returned["benchmark"]
    for key in ("client_train_s", "no_gfmfr_clients_train_wall_s", "server_s", "baseline_server_s", "grouping_wall_s",
                "reduce_wall_s", "group_fusion_wall_s", "teacher_wall_s", "ratio", "baseline_ratio", "ratio_cpu",
                "distillation_client_overhead"):
        assert figures[key] > 0, key
    # the reference training (autograd + torch.optim.SGD) takes the same steps, up to float32 rounding
    assert figures["reference_max_param_diff"] < 1e-3
    assert [r["fusion_epochs"] for r in figures["gfmfr_rounds"]] == [50, 50]
    assert [r["distilled"] for r in figures["gfmfr_rounds"]] == [0, 204]  # KU: every user from round 1
    # model.gfmfr.regroup_every=3 between groupings: round 1 keeps every user's round-0 id, no clustering
    assert [r["kept_clients"] for r in figures["gfmfr_rounds"]] == [0, 204]
    assert 0 < figures["regroup_between_cpu_s"] < figures["server_cpu_s"]
    assert figures["regroup_between_s"] <= figures["regroup_server_s"] <= figures["server_s"] + 1e-9
