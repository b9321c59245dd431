"""The robustness report's command (bench/robustness.py) on a few of its cases, those that start no
Ray: each is the real CLI in a subprocess, refused (or, with --skip-missing, counted) with its
target digested before and after. The Ray cases run in tests/on_ray/test_nothing_lost.py."""

from __future__ import annotations

import json

import pytest

from bench import robustness

QUICK = ["synth-onto-folder", "malformed-yaml", "choice-empty", "cut-last-line-skip", "decimal-id"]


def test_quick_cases_are_refused_and_leave_their_data_intact(tmp_path):
    rows = robustness.run_cases(QUICK, tmp_path, echo=False)
    assert sorted(row["case"] for row in rows) == sorted(QUICK)  # run in the module's order
    for row in rows:
        assert row["intact"] and row["as_designed"] and not row["traceback"], row
        assert row["digest_before"] == row["digest_after"] and row["target_entries"] > 1, row
    by_case = {row["case"]: row for row in rows}
    assert by_case["synth-onto-folder"]["exit"] == 2
    assert by_case["synth-onto-folder"]["message"] == [
        "error: refusing to replace <work>/synth/my_folder: it exists and is not a synthetic dataset written by "
        "`pipeline data synth` (no synthetic.json of its own); choose another --out"]
    assert by_case["malformed-yaml"]["message"] == [
        "error: <work>/malformed_yaml/broken.yaml:3:6: not valid YAML: expected ',' or ']', but got ':' (while "
        "parsing a flow sequence)"]
    assert by_case["choice-empty"]["message"] == [
        "error: <work>/sweep_empty_choice/space.yaml: params.train.participation: choice needs a non-empty list of "
        "values, got []"]
    assert by_case["cut-last-line-skip"]["exit"] == 0
    assert by_case["cut-last-line-skip"]["message"][0].split() == ["skipped_rows_missing_fields", "1"]
    assert by_case["decimal-id"]["message"][0].endswith("row 6, column 'item_id': id '1.5' is not an integer: ids "
                                                        "are whole numbers or names, not decimal numbers")


def test_a_changed_or_removed_entry_is_not_intact(tmp_path):
    folder = tmp_path / "target"
    folder.mkdir()
    (folder / "a.txt").write_text("one\n")
    before = robustness.digest(folder)

    def outcome(after):
        return robustness.Outcome(["x"], 2, "", "error: no", folder, before, after)

    (folder / "cache").mkdir()
    (folder / "cache" / "b.bin").write_bytes(b"x")
    added = outcome(robustness.digest(folder))
    assert added.intact and added.as_designed and added.added == ["cache"]
    (folder / "a.txt").write_text("two\n")  # same size, other bytes
    assert not outcome(robustness.digest(folder)).intact
    (folder / "a.txt").unlink()
    assert not outcome(robustness.digest(folder)).intact
    assert not robustness.Outcome(["x"], 2, "", "", folder, {}, {}).intact  # a target that never existed


def test_the_report_names_its_command_and_refuses_a_file_it_did_not_write(tmp_path, capsys):
    notes = tmp_path / "notes.md"
    notes.write_text("# my notes\n")
    with pytest.raises(SystemExit):
        robustness.main(["--cases", "malformed-yaml", "--out", str(notes)])
    assert notes.read_text() == "# my notes\n"
    out = tmp_path / "robustness.md"
    figures = robustness.main(["--cases", "malformed-yaml", "--out", str(out)])
    assert figures["cases"] == figures["intact"] == figures["as_designed"] == 1
    text = out.read_text()
    assert text.splitlines()[0] == f"<!-- made by: python -m bench.robustness --cases malformed-yaml --out {out} -->"
    assert "| 1 | a malformed YAML config | 2 | yes | yes |" in text
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["bench"] == "robustness"
    robustness.main(["--cases", "malformed-yaml", "--out", str(out)])  # its own report: refreshed
