"""bench.round runs the real `pipeline train` command end to end and reports its start-up phases
(from the job's summary) and per-round phases, ending with one JSON line. No timing is asserted
(benchmarks are not tests), only that every phase was measured and the parts fit in the whole."""

from __future__ import annotations

import json

from bench import round as bench_round


def test_round_bench_measures_every_phase_of_a_real_run(capsys):
    assert bench_round.main(["--quick", "--rounds", "2", "--baseline-set", "train.eval_every=2"]) == 0
    lines = [line for line in capsys.readouterr().out.strip().splitlines() if line.strip()]
    assert sum(line.startswith("{") for line in lines) == 1
    figures = json.loads(lines[-1])
    assert (figures["bench"], figures["dataset"], figures["method"], figures["rounds"]) == ("round", "synthetic", "id", 2)
    for side in ("", "baseline_"):
        for key in ("imports_s", "data_s", "ray_s", "server_s", "first_round_s", "shutdown_s", "total_s"):
            assert figures[side + key] > 0, side + key
        assert figures[side + "round_s"] >= figures[side + "train_s"] > 0
        startup = sum(figures[side + k] for k in ("imports_s", "data_s", "ray_s", "server_s", "first_round_s"))
        assert startup < figures[side + "total_s"]
    # the baseline evaluates every second round only: its round 1 has no evaluation
    assert figures["eval_s"] > 0.001 > figures["baseline_eval_s"]
    assert figures["ratio"] == figures["baseline_round_s"] / figures["round_s"]
