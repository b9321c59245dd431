"""Robustness report: each hostile use of the CLI tried against real processes, on throwaway data.

    python -m bench.robustness --out results/robustness.md     # every case (a few minutes on 2 cores)
    python -m bench.robustness --cases malformed-yaml choice-empty    # some of them (--list names them)

Every case runs `python -m pipeline ...` in a subprocess, as a careless or hostile user would type
it, inside a temporary folder holding only data made here (the synthetic generator at 30 users,
a feature store of random vectors, a generic interactions file written from the generator): no
dataset files are read, so it runs on a fresh clone. Before and after the command the case's
target (the folder or file the command could damage: an --out, an input, a run directory, the
case's whole folder) is digested, every file's size and sha256, so "data intact" is measured, not
assumed. Each case records the command, its exit code, the message the user sees (the `error:`
line(s) on stderr, else its first lines) and whether that outcome is the designed one: a refusal
(non-zero exit, no traceback) with nothing changed, or, for the two cases that must work (encode
beside another Ray cluster, a cut line with --skip-missing), success with the input unchanged.

Paths inside messages are shown relative to the case folder (`<work>`). Ray: the training cases
start their own local instance (the CLI's rule); the encode case starts a Ray head of its own
with a private RAY_TMPDIR (so no other job on the machine sees it) and stops it by its process
group. The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bench._common import emit_json

REPO = Path(__file__).resolve().parents[1]
PROGRAM = "python -m bench.robustness"
USERS, ITEMS = 30, 25
TINY = [f"data.synthetic={{n_users: {USERS}, n_items: {ITEMS}, images: false}}", "runtime.pools=1",
        "runtime.progress=false"]
ROUNDS = 5
TIMEOUT = 300


# --- processes, digests ----------------------------------------------------------------------------


def env(**extra) -> dict:
    """This environment without a Ray address or temp dir of someone else's, offline for Hugging Face."""
    out = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    out.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", **extra)
    return out


def pipeline_args(*args) -> list[str]:
    return [sys.executable, "-m", "pipeline", *map(str, args)]


def run_pipeline(cwd: Path, *args, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run(pipeline_args(*args), cwd=cwd, env=env(**extra_env), capture_output=True, text=True,
                          timeout=TIMEOUT)


def digest(path: Path) -> dict:
    """Every path under `path` (or the file itself) -> "dir" or (size, sha256); {} when absent."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return {}
    files = [path] if not path.is_dir() else [path, *sorted(path.rglob("*"))]
    return {p.relative_to(path).as_posix() if p != path else ".":
            "dir" if p.is_dir() else (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()) for p in files}


def fingerprint(tree: dict) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:12]


# --- one case --------------------------------------------------------------------------------------


CHECKED_NOTES = ("first job finished", "other cluster still running", "feature store written", "skipped rows shown")


@dataclass
class Outcome:
    """What a case observed. expect: "refused" or "succeeds"."""

    command: list[str]
    returncode: int
    stdout: str
    stderr: str
    target: Path
    before: dict
    after: dict
    expect: str = "refused"
    notes: dict = field(default_factory=dict)
    shown: list[str] | None = None  # the output lines that show the outcome, where the case picks them

    @property
    def intact(self) -> bool:
        """Everything the target held before is there after, byte for byte (and the target existed)."""
        return bool(self.before) and all(self.after.get(key) == value for key, value in self.before.items())

    @property
    def added(self) -> list[str]:
        """Entries that appeared under the target, each new subtree by its top (e.g. a cache folder)."""
        new = [key for key in self.after if key not in self.before]
        return [key for key in new if key.rpartition("/")[0] not in new]

    @property
    def traceback(self) -> bool:
        return "Traceback" in self.stderr

    @property
    def as_designed(self) -> bool:
        ok = (self.returncode == 0) if self.expect == "succeeds" else (self.returncode != 0 and not self.traceback)
        return ok and self.intact and all(self.notes.get(key, True) for key in CHECKED_NOTES) and not any(
            self.notes.get(key, False) for key in ("joined the other cluster",))

    def message(self, limit: int = 3) -> list[str]:
        """The error line(s) the user sees on stderr; without one, the lines the case picked, else
        stderr's (else stdout's) first lines."""
        if self.shown is not None and self.returncode == 0:
            return self.shown[:limit]
        lines = [line.rstrip() for line in self.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        if errors:
            return errors[:limit]
        if lines:
            return lines[:limit]
        return [line.rstrip() for line in self.stdout.splitlines() if line.strip()][:limit]


def attempt(cwd: Path, target: Path, *args, expect: str = "refused", **extra_env) -> Outcome:
    """Run `python -m pipeline ARGS` in `cwd`, digesting `target` before and after."""
    before = digest(target)
    done = run_pipeline(cwd, *args, **extra_env)
    return Outcome([*pipeline_args(*args)[3:]], done.returncode, done.stdout, done.stderr, target, before,
                   digest(target), expect)


# --- what the cases share: a folder, a dataset, a trained run -------------------------------------


class Context:
    def __init__(self, work: Path):
        self.work = work
        self._dataset: Path | None = None
        self.run: Path | None = None

    def folder(self, name: str) -> Path:
        path = self.work / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def dataset(self) -> Path:
        """A synthetic dataset folder (catalogue.csv, interactions.parquet), the encode cases' input."""
        if self._dataset is None:
            from pipeline.data import synthetic

            config = synthetic.SyntheticConfig(n_users=USERS, n_items=20, images=False)
            self._dataset = synthetic.write(synthetic.generate(config, progress=False), self.work / "dataset",
                                            progress=False)
        return self._dataset

    def trained(self) -> Path:
        """A finished run directory (made by the two-writers case when it ran first, else trained here)."""
        if self.run is None:
            run = self.work / "run"
            done = run_pipeline(self.work, "train", "--out", run, "--set", *TINY, f"train.rounds={ROUNDS}")
            if done.returncode != 0:
                raise RuntimeError(f"training the run the export cases need failed:\n{done.stderr[-3000:]}")
            self.run = run
        return self.run


def generic_interactions(folder: Path) -> Path:
    """A generic-format interactions.csv of the synthetic generator's interactions (user_id, item_id, timestamp)."""
    import pandas as pd

    from pipeline.data import synthetic

    data = synthetic.generate(synthetic.SyntheticConfig(n_users=USERS, n_items=20, images=False), progress=False)
    inter = data.dataset.interactions
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "interactions.csv"
    pd.DataFrame({"user_id": inter.user, "item_id": inter.item, "timestamp": inter.timestamp}).to_csv(path, index=False)
    return path


def tiny_config(folder: Path) -> Path:
    path = folder / "tiny.yaml"
    path.write_text(f"name: tiny\ndata:\n  synthetic: {{n_users: {USERS}, n_items: {ITEMS}, images: false}}\n"
                    f"train:\n  rounds: 2\nruntime:\n  pools: 1\n  progress: false\n")
    return path


# --- the cases -------------------------------------------------------------------------------------


def case_two_writers(ctx: Context) -> Outcome:
    """A second `train` into the run directory a first `train` is writing. The first job is paused
    (SIGSTOP) once it has written a round and its folder has stopped changing, so the digest before
    and after the second writer measures only what the second writer did; then it is let go and
    must finish every round."""
    run = ctx.work / "run"
    first = subprocess.Popen(pipeline_args("train", "--out", run, "--set", *TINY, f"train.rounds={ROUNDS}"),
                             cwd=ctx.work, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    paused = False
    try:
        log, deadline = run / "metrics.jsonl", time.monotonic() + TIMEOUT
        while first.poll() is None and time.monotonic() < deadline and not (
                log.is_file() and log.read_text().count("\n") >= 1):
            time.sleep(0.02)
        if first.poll() is not None:
            raise RuntimeError(f"the first job ended before the second could start:\n{first.stderr.read()[-3000:]}")
        first.send_signal(signal.SIGSTOP)
        paused = True
        state, deadline = digest(run), time.monotonic() + 60
        while time.monotonic() < deadline:  # its Server may finish the round in flight: wait until still
            time.sleep(1.0)
            state, previous = digest(run), state
            if state == previous:
                break
        outcome = attempt(ctx.work, run, "train", "--out", run, "--set", *TINY, f"train.rounds={ROUNDS}")
        outcome.notes["first job paused after rounds"] = len(log.read_text().splitlines())
        first.send_signal(signal.SIGCONT)
        paused = False
        _, err = first.communicate(timeout=TIMEOUT)
        rounds = [json.loads(line)["round"] for line in log.read_text().splitlines()]
        outcome.notes["first job finished"] = first.returncode == 0 and rounds == list(range(ROUNDS))
        outcome.notes["first job's rounds"] = rounds
        if first.returncode == 0:
            ctx.run = run
        return outcome
    finally:
        if paused:
            first.send_signal(signal.SIGCONT)
        if first.poll() is None:
            first.kill()
            first.wait()


def case_export_onto_run(ctx: Context) -> Outcome:
    run = ctx.trained()
    return attempt(ctx.work, run, "export", "--run", run, "--out", run, "--overwrite")


def case_export_onto_user_file(ctx: Context) -> Outcome:
    folder = ctx.folder("export_file")
    mine = folder / "some_file.txt"
    mine.write_text("my notes\n")
    return attempt(ctx.work, folder, "export", "--run", ctx.trained(), "--out", mine, "--overwrite")


def case_resume_other_config(ctx: Context) -> Outcome:
    run = ctx.work / "run_resumed"
    shutil.copytree(ctx.trained(), run)
    return attempt(ctx.work, run, "train", "--resume", "--out", run, "--set", *TINY, f"train.rounds={ROUNDS + 2}",
                   "model.dim=32", "train.seed=7")


def case_encode_onto_input(ctx: Context) -> Outcome:
    data = ctx.dataset
    return attempt(ctx.work, data, "encode", data, "--out", data, "--overwrite", "--text-model", "tiny-clip",
                   "--image-model", "none", "--no-progress")


def case_synth_onto_user_folder(ctx: Context) -> Outcome:
    parent = ctx.folder("synth")
    mine = parent / "my_folder"
    mine.mkdir()
    (mine / "thesis.tex").write_text("chapter one\n")
    return attempt(parent, parent, "data", "synth", "--out", mine, "--users", USERS, "--items", 20, "--no-images",
                   "--overwrite")


def case_encode_beside_cluster(ctx: Context) -> Outcome:
    """`ray start --head` runs on the machine (its address file in a private RAY_TMPDIR, which the
    encode command is given too, so a command that joined whatever cluster runs would find it)."""
    data = ctx.dataset
    ray_tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # short: Ray's socket paths live under it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", f"--port={port}",
                             "--num-cpus=1", "--include-dashboard=false", "--block"], env=env(RAY_TMPDIR=ray_tmp),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        address_file, deadline = Path(ray_tmp) / "ray" / "ray_current_cluster", time.monotonic() + 120
        while not address_file.is_file() and head.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if not address_file.is_file():
            raise RuntimeError("the other Ray cluster (ray start --head) did not start")
        outcome = attempt(ctx.work, data, "encode", data / "catalogue.csv", "--out", ctx.work / "features",
                          "--text-model", "tiny-clip", "--image-model", "none", "--no-progress", expect="succeeds",
                          RAY_TMPDIR=ray_tmp)
        outcome.notes["other cluster still running"] = head.poll() is None
        outcome.notes["joined the other cluster"] = "num_cpus and num_gpus must not be provided" in outcome.stderr
        outcome.notes["feature store written"] = (ctx.work / "features" / "manifest.json").is_file()
        outcome.shown = [line for line in outcome.stdout.splitlines() if line.strip()]
        return outcome
    finally:
        stop_group(head)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def stop_group(process: subprocess.Popen) -> None:
    """End a process this module started and its process group, by id."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            time.sleep(0.5)
            os.killpg(process.pid, 0)  # members of the group still alive?
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def case_eval_ks(ctx: Context) -> Outcome:
    folder = ctx.folder("eval_ks")
    return attempt(folder, folder, "train", "--out", folder / "run", "--set", *TINY, "train.eval_ks=[5, 500]")


def _sweep(ctx: Context, name: str, spec: dict) -> Outcome:
    import yaml

    folder = ctx.folder(name)
    space = folder / "space.yaml"
    space.write_text(yaml.safe_dump({"base": str(tiny_config(folder)), "params": {"train.participation": spec}},
                                    default_flow_style=None))
    return attempt(folder, folder, "sweep", "--space", space, "--name", "s", "--storage", folder / "sweeps")


def case_sweep_beyond_range(ctx: Context) -> Outcome:
    return _sweep(ctx, "sweep_beyond_range", {"uniform": [0.5, 2.0]})


def case_sweep_empty_choice(ctx: Context) -> Outcome:
    return _sweep(ctx, "sweep_empty_choice", {"choice": []})


def case_sweep_reversed(ctx: Context) -> Outcome:
    return _sweep(ctx, "sweep_reversed", {"uniform": [1.0, 0.1]})


def case_nan_features(ctx: Context) -> Outcome:
    import numpy as np

    from pipeline.encode.store import write_store

    folder = ctx.folder("nan_features")
    text = np.random.default_rng(0).normal(size=(ITEMS, 8)).astype(np.float32)
    text[3, 2] = np.nan
    store = write_store(folder / "features", np.arange(ITEMS), {"text": text}, {"modalities": {"text": {"dim": 8}}})
    return attempt(folder, folder, "train", "--out", folder / "run", "--set", *TINY, f"data.features={store}",
                   "model.fusion={modalities: [id, text]}")


def case_malformed_yaml(ctx: Context) -> Outcome:
    folder = ctx.folder("malformed_yaml")
    broken = folder / "broken.yaml"
    broken.write_text("train:\n  rounds: [3\nmodel: {}\n")
    return attempt(folder, folder, "train", "--config", broken, "--out", folder / "run")


def case_fusion_on_id_only(ctx: Context) -> Outcome:
    folder = ctx.folder("fusion_on_id_only")
    return attempt(folder, folder, "train", "--out", folder / "run", "--set", *TINY, "model.fusion.fusion=sum")


def _cut_last_line(folder: Path) -> Path:
    path = generic_interactions(folder / "mine")
    text = path.read_text().rstrip("\n")
    path.write_text(text.rsplit(",", 1)[0] + "\n")  # the last line lost its timestamp
    return path


def case_cut_last_line(ctx: Context) -> Outcome:
    folder = ctx.folder("cut_last_line")
    path = _cut_last_line(folder)
    return attempt(folder, folder, "data", "stats", path.parent, "--format", "generic")


def case_cut_last_line_skipped(ctx: Context) -> Outcome:
    folder = ctx.folder("cut_last_line_skipped")
    path = _cut_last_line(folder)
    outcome = attempt(folder, folder, "data", "stats", path.parent, "--format", "generic", "--skip-missing",
                      expect="succeeds")
    outcome.shown = [line for line in outcome.stdout.splitlines() if line.startswith("skipped_rows_missing_fields")]
    outcome.notes["skipped rows shown"] = [line.split() for line in outcome.shown] == [["skipped_rows_missing_fields",
                                                                                       "1"]]
    return outcome


def case_decimal_id(ctx: Context) -> Outcome:
    folder = ctx.folder("decimal_id")
    path = generic_interactions(folder / "mine")
    lines = path.read_text().splitlines()
    user, _, timestamp = lines[5].split(",")
    lines[5] = f"{user},1.5,{timestamp}"
    path.write_text("\n".join(lines) + "\n")
    return attempt(folder, folder, "data", "stats", path.parent, "--format", "generic")


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    run: Callable[[Context], Outcome]
    ray: bool = False  # starts Ray, or needs the trained run (which does)


CASES = [  # the two-writers case first: the run it leaves serves the export and resume cases
    Case("two-writers", "two trainings into one run directory at once", case_two_writers, ray=True),
    Case("export-onto-run", "export --out onto its run directory (with --overwrite)", case_export_onto_run, ray=True),
    Case("export-onto-file", "export --out onto a user's file (with --overwrite)", case_export_onto_user_file, ray=True),
    Case("resume-other-config", "--resume with another config (model.dim=32, train.seed=7)", case_resume_other_config,
         ray=True),
    Case("encode-onto-input", "encode --out onto its own input folder (with --overwrite)", case_encode_onto_input),
    Case("synth-onto-folder", "data synth --out onto a user's folder (with --overwrite)", case_synth_onto_user_folder),
    Case("encode-beside-cluster", "encode while another Ray cluster runs on the machine", case_encode_beside_cluster,
         ray=True),
    Case("eval-ks", "train.eval_ks=[5, 500] without the selection metric's K (hr@50)", case_eval_ks),
    Case("uniform-beyond-range", "sweep: participation {uniform: [0.5, 2.0]}", case_sweep_beyond_range),
    Case("choice-empty", "sweep: participation {choice: []}", case_sweep_empty_choice),
    Case("uniform-reversed", "sweep: participation {uniform: [1.0, 0.1]}", case_sweep_reversed),
    Case("nan-features", "a feature store whose text.npy holds NaN", case_nan_features),
    Case("malformed-yaml", "a malformed YAML config", case_malformed_yaml),
    Case("fusion-on-id-only", "a fusion key (model.fusion.fusion=sum) on an ID-only config", case_fusion_on_id_only),
    Case("cut-last-line", "a generic interactions file whose last line is cut before a field", case_cut_last_line),
    Case("cut-last-line-skip", "the same file with --skip-missing (a documented option): counted",
         case_cut_last_line_skipped),
    Case("decimal-id", "a non-integer id (1.5) in a generic interactions file", case_decimal_id),
]
BY_NAME = {case.name: case for case in CASES}


# --- running and reporting -------------------------------------------------------------------------


def shown(text: str, work: Path) -> str:
    for prefix in (str(work.resolve()), str(work)):
        text = text.replace(prefix, "<work>")
    return text


def run_cases(names: list[str], work: Path, echo: bool = True) -> list[dict]:
    """Run the named cases in `work` (in CASES order); one row per case."""
    ctx, rows = Context(work), []
    for case in [c for c in CASES if c.name in names]:
        started = time.perf_counter()
        try:
            outcome = case.run(ctx)
        except Exception as error:  # the case could not be set up: reported, not hidden
            rows.append({"case": case.name, "title": case.title, "error": f"{type(error).__name__}: {error}"[:2000],
                         "as_designed": False, "intact": False, "seconds": round(time.perf_counter() - started, 1)})
            if echo:
                print(f"{case.name}: could not run: {rows[-1]['error']}", flush=True)
            continue
        row = {"case": case.name, "title": case.title, "expect": outcome.expect,
               "command": shown("python -m pipeline " + " ".join(shlex.quote(a) for a in outcome.command), work),
               "exit": outcome.returncode, "message": [shown(line, work) for line in outcome.message()],
               "traceback": outcome.traceback, "target": shown(str(outcome.target), work),
               "target_entries": len(outcome.before), "digest_before": fingerprint(outcome.before),
               "digest_after": fingerprint(outcome.after), "intact": outcome.intact,
               "changed": sorted(key for key, value in outcome.before.items() if outcome.after.get(key) != value)[:10],
               "added": outcome.added[:10],
               "as_designed": outcome.as_designed, "notes": outcome.notes,
               "seconds": round(time.perf_counter() - started, 1)}
        rows.append(row)
        if echo:
            print(f"{case.name}: exit {row['exit']}, data intact {'yes' if row['intact'] else 'NO'}, as designed "
                  f"{'yes' if row['as_designed'] else 'NO'}: {' / '.join(row['message'])}", flush=True)
    return rows


def report(rows: list[dict], seconds: float) -> str:
    designed = sum(r["as_designed"] for r in rows)
    intact = sum(r["intact"] for r in rows)
    lines = ["# Robustness: hostile uses of the CLI against real processes", "",
             f"{len(rows)} cases, each `python -m pipeline ...` in a subprocess on throwaway data made by the synthetic "
             f"generator ({USERS} users) in a temporary folder, shown as `<work>`; {seconds:.0f} s in all. Data intact: "
             f"{intact}/{len(rows)}; outcome as designed: {designed}/{len(rows)}.", "",
             "- **data intact**: a digest (every path, size and sha256) of the target taken before and after the "
             "command: every entry it held before is there after, unchanged. Entries that appeared are listed "
             "under the case.",
             "- **as designed**: a refusal exits non-zero without a traceback; a case that must work exits 0. "
             "Either way the target is intact.",
             "- **message**: the `error:` line(s) on stderr, as the user sees them (else the first lines of output).",
             "", "| # | case | exit | data intact | as designed |", "|---|---|---|---|---|"]
    for number, row in enumerate(rows, 1):
        lines.append(f"| {number} | {row['title']} | {row.get('exit', 'n/a')} | "
                     f"{'yes' if row['intact'] else 'no'} | {'yes' if row['as_designed'] else 'no'} |")
    lines += ["", "## The cases", ""]
    for number, row in enumerate(rows, 1):
        lines += [f"### {number}. {row['title']} (`{row['case']}`)", ""]
        if "error" in row:
            lines += [f"Could not be run: {row['error']}", ""]
            continue
        lines += [f"- command: `{row['command']}`",
                  f"- exit code: {row['exit']}{' (a traceback was printed)' if row['traceback'] else ''}",
                  f"- target: `{row['target']}`, {row['target_entries']} entries, digest {row['digest_before']} before, "
                  f"{row['digest_after']} after: data intact: {'yes' if row['intact'] else 'no'}"
                  + (f" (changed or removed: {', '.join(row['changed'])})" if row["changed"] else "")]
        if row["added"]:
            lines.append(f"- added under the target: {', '.join(f'`{key}`' for key in row['added'])}"
                         + (" (the prepared-data cache of the generated data, written when the dataset is opened)"
                            if all(key.startswith('runs') for key in row["added"]) else ""))
        for key, value in row["notes"].items():
            lines.append(f"- {key}: {json.dumps(value) if not isinstance(value, bool) else ('yes' if value else 'no')}")
        lines += ["- message:", "", "```", *row["message"], "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(BY_NAME), default=list(BY_NAME),
                        help="which cases (default: all)")
    parser.add_argument("--no-ray", action="store_true", help="only the cases that start no Ray")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--out", type=Path, help="write the Markdown report here (a file this command wrote, or new)")
    args = parser.parse_args(argv)
    if args.list:
        for case in CASES:
            print(f"{case.name:24s} {case.title}")
        return {}
    names = [name for name in args.cases if not (args.no_ray and BY_NAME[name].ray)]
    command = PROGRAM + (" --no-ray" if args.no_ray else "") + (
        " --cases " + " ".join(args.cases) if set(args.cases) != set(BY_NAME) else "") + (
        f" --out {args.out}" if args.out else "")
    if args.out:  # before any work: never replace a file this command did not write
        from pipeline.outputs import made_by

        if args.out.is_dir() or (args.out.exists() and not made_by(args.out, PROGRAM)):
            parser.error(f"refusing to replace {args.out}: it exists and is not a report written by `{PROGRAM}`")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="robustness-") as tmp:
        rows = run_cases(names, Path(tmp))
    seconds = time.perf_counter() - started
    text = report(rows, seconds)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"<!-- made by: {command} -->\n{text}")
    figures = {"bench": "robustness", "cases": len(rows), "seconds": round(seconds, 1),
               "intact": sum(r["intact"] for r in rows), "as_designed": sum(r["as_designed"] for r in rows),
               "results": {r["case"]: {"exit": r.get("exit"), "intact": r["intact"], "as_designed": r["as_designed"]}
                           for r in rows}}
    emit_json(figures)
    return figures


if __name__ == "__main__":
    figures = main()
    sys.exit(0 if figures == {} or figures["as_designed"] == figures["cases"] else 1)
