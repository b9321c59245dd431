"""Nothing lost: commands never delete or replace what they did not make, a resume continues the
run it names under that run's config, one job at a time writes a run directory, and every command
starts its own Ray unless told an address. The real CLI in subprocesses, on tiny synthetic data;
each refusal is checked by its message and by a digest of the target before and after."""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bench.robustness import stop_group

REPO = Path(__file__).resolve().parents[2]
TINY = ["data.synthetic={n_users: 30, n_items: 25, images: false}", "runtime.pools=1", "runtime.progress=false"]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", **extra)
    return env


def run_cli(cwd: Path, *args, timeout=240, **env):
    """`python -m pipeline ARGS` in `cwd`."""
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], cwd=cwd, env=_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def digest(path: Path) -> dict:
    """Every path under `path` (or the file itself) with its size and sha256."""
    path = Path(path)
    if not path.exists():
        return {}
    files = [path] if path.is_file() else sorted(path.rglob("*"))
    return {p.relative_to(path).as_posix() if p != path else ".":
            "dir" if p.is_dir() else (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()) for p in files}


def refused(done, *needles):
    """A clean refusal: non-zero exit, no traceback, the message's pieces on stderr."""
    assert done.returncode != 0, done.stdout[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    for needle in needles:
        assert needle in done.stderr, done.stderr[-3000:]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="module")
def trained(work):
    """A 2-round run, trained while a second job tried to train into the same run directory."""
    run = work / "run"
    first = subprocess.Popen([sys.executable, "-m", "pipeline", "train", "--out", str(run), "--set", *TINY,
                              "train.rounds=2"], cwd=work, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / ".lock").is_file() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        started = time.monotonic()
        second = run_cli(work, "train", "--out", run, "--set", *TINY, "train.rounds=2")
        second_seconds = time.monotonic() - started
        first_running = first.poll() is None
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-3000:]
    return {"run": run, "first_pid": first.pid, "second": second, "second_seconds": second_seconds,
            "first_running": first_running}


@pytest.fixture(scope="module")
def dataset(work):
    """A tiny synthetic dataset folder (catalogue.csv, interactions) for encode to read."""
    from pipeline.data import synthetic

    config = synthetic.SyntheticConfig(n_users=30, n_items=20, images=False)
    return synthetic.write(synthetic.generate(config, progress=False), work / "dataset", progress=False)


# -------------------------------------------------------------------------------- export


@pytest.mark.slow  # real Ray (the trained fixture or a Ray head)
def test_export_onto_its_run_directory_is_refused(trained, work):
    run = trained["run"]
    before = digest(run)
    for extra in ([], ["--overwrite"]):
        done = run_cli(work, "export", "--run", run, "--out", run, *extra)
        refused(done, f"refusing to write an export to {run}: it is the command's input {run}")
    inside = run_cli(work, "export", "--run", run, "--out", run / "export", "--overwrite")
    refused(inside, "it is inside the command's input")
    assert digest(run) == before


@pytest.mark.slow  # real Ray (the trained fixture or a Ray head)
def test_export_onto_a_user_file_is_refused(trained, work):
    mine = work / "some_file.txt"
    mine.write_text("my notes\n")
    before = digest(mine)
    done = run_cli(work, "export", "--run", trained["run"], "--out", mine, "--overwrite")
    refused(done, f"refusing to replace {mine}: it exists and is not a folder `pipeline export` wrote")
    assert digest(mine) == before


@pytest.mark.slow  # real Ray (the trained fixture or a Ray head)
def test_export_replaces_an_earlier_export_only_with_overwrite(trained, work):
    out = work / "export"
    assert run_cli(work, "export", "--run", trained["run"], "--out", out).returncode == 0
    before = digest(out)
    again = run_cli(work, "export", "--run", trained["run"], "--out", out)
    refused(again, f"{out} already holds an export from an earlier `pipeline export`; pass --overwrite")
    assert digest(out) == before
    done = run_cli(work, "export", "--run", trained["run"], "--out", out, "--overwrite")
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(digest(out)) == ["model.safetensors", "model_card.json"]
    (out / "notes.txt").write_text("mine")  # an export folder with a user's file in it is not replaced
    before = digest(out)
    refused(run_cli(work, "export", "--run", trained["run"], "--out", out, "--overwrite"),
            "it holds notes.txt, which `pipeline export` did not write")
    assert digest(out) == before


# -------------------------------------------------------------------------------- encode and data synth


def test_encode_onto_its_input_is_refused(dataset, work):
    before = digest(dataset)
    for source in (dataset, dataset / "catalogue.csv"):
        done = run_cli(work, "encode", source, "--out", dataset, "--overwrite", "--text-model", "tiny-clip",
                       "--image-model", "none")
        refused(done, f"refusing to write a feature store to {dataset}: it ")
    assert digest(dataset) == before


def test_data_synth_onto_a_user_folder_is_refused(work):
    mine = work / "my_folder"
    mine.mkdir()
    (mine / "thesis.tex").write_text("chapter one\n")
    before = digest(mine)
    for extra in ([], ["--overwrite"]):
        done = run_cli(work, "data", "synth", "--out", mine, "--users", 30, "--items", 20, "--no-images", *extra)
        refused(done, f"refusing to replace {mine}: it exists and is not a synthetic dataset written by "
                      f"`pipeline data synth`")
    assert digest(mine) == before
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(".my_folder")) == []


def test_data_synth_replaces_its_own_output_only_with_overwrite(work):
    out = work / "synth"
    args = ("data", "synth", "--out", out, "--users", 30, "--items", 20, "--no-images")
    assert run_cli(work, *args).returncode == 0
    before = digest(out)
    refused(run_cli(work, *args, "--seed", 1), f"{out} already holds a synthetic dataset from an earlier "
                                               f"`pipeline data synth`; pass --overwrite to replace it")
    assert digest(out) == before
    done = run_cli(work, *args, "--seed", 1, "--overwrite")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "synthetic.json").read_text())["seed"] == 1


# -------------------------------------------------------------------------------- run directories


@pytest.mark.slow  # real Ray (the trained fixture or a Ray head)
def test_a_second_writer_fails_at_once_and_the_first_is_intact(trained):
    second, run = trained["second"], trained["run"]
    refused(second, f"{run} is being written by another job: pid {trained['first_pid']} on host "
                    f"{socket.gethostname()}")
    assert trained["first_running"], "the first job ended before the second was refused"
    assert trained["second_seconds"] < 60
    rounds = [json.loads(line)["round"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [0, 1]
    assert not (run / ".lock").exists()


@pytest.mark.slow  # real Ray (the trained fixture or a Ray head)
def test_resume_with_another_config_is_refused(trained, work):
    run = work / "resume_refused"
    shutil.copytree(trained["run"], run)
    before = digest(run)
    done = run_cli(work, "train", "--resume", "--out", run, "--set", *TINY, "train.rounds=3", "model.dim=32",
                   "train.seed=7")
    refused(done, f"cannot resume {run} with another config", "model.dim: 64 in the run, 32 now",
            "train.seed: 0 in the run, 7 now")
    assert "train.rounds:" not in done.stderr and "runtime.out:" not in done.stderr
    assert digest(run) == before


@pytest.mark.slow  # real Ray (the trained fixture or a Ray head)
def test_resume_with_more_rounds_takes_over_a_stale_lock(trained, work):
    run = work / "resume_more"
    shutil.copytree(trained["run"], run)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process that held the lock and died without removing it
    (run / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid, "since": "earlier"}))
    done = run_cli(work, "train", "--resume", "--out", run, "--set", *TINY, "train.rounds=3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"was left by pid {gone.pid} on host {socket.gethostname()}" in done.stderr
    assert "which no longer runs: a stale lock; taking the run directory over" in done.stderr
    rounds = [json.loads(line)["round"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [0, 1, 2]
    assert not (run / ".lock").exists()


# -------------------------------------------------------------------------------- Ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # real Ray (the trained fixture or a Ray head)
def test_encode_starts_its_own_ray_beside_a_running_head(dataset, work):
    """`ray start --head` on the machine (its address file in a temp dir of the test's own, so
    nobody else's ray.init sees it): encode still starts a local instance of its own."""
    ray_tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths live under it
    port = _free_port()
    ray_bin = Path(sys.executable).with_name("ray")
    head = subprocess.Popen([str(ray_bin), "start", "--head", f"--port={port}", "--num-cpus=1",
                             "--include-dashboard=false", "--block"], env=_env(RAY_TMPDIR=ray_tmp),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        address_file = Path(ray_tmp) / "ray" / "ray_current_cluster"
        deadline = time.monotonic() + 120
        while not address_file.is_file() and head.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert address_file.is_file(), "the Ray head did not start"
        out = work / "features"
        done = run_cli(work, "encode", dataset / "catalogue.csv", "--out", out, "--text-model", "tiny-clip",
                       "--image-model", "none", "--no-progress", "--json", RAY_TMPDIR=ray_tmp)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "num_cpus and num_gpus must not be provided" not in done.stderr
        assert json.loads(done.stdout)["item_count"] == 20
        assert (out / "text.npy").is_file()
    finally:
        stop_group(head)  # its own process group, never `ray stop` (every Ray instance here)
        shutil.rmtree(ray_tmp, ignore_errors=True)


# -------------------------------------------------------------------------------- the rules, in-process


def test_output_rules(tmp_path):
    from pipeline.outputs import OutputError, check_output
    from pipeline.trained import EXPORT_OUTPUT

    other_run = tmp_path / "other_run"
    (other_run / "checkpoints").mkdir(parents=True)
    (other_run / "config.yaml").write_text("name: x\n")
    with pytest.raises(OutputError, match="it is a training run directory"):
        check_output(other_run, EXPORT_OUTPUT, overwrite=True)
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", EXPORT_OUTPUT)  # nothing there to lose
    check_output(tmp_path / "new", EXPORT_OUTPUT)
    (tmp_path / "link").symlink_to(other_run)
    with pytest.raises(OutputError, match="it is the command's input"):
        check_output(tmp_path / "link", EXPORT_OUTPUT, inputs=[other_run], overwrite=True)
    with pytest.raises(OutputError, match="it contains the command's input"):
        check_output(tmp_path, EXPORT_OUTPUT, inputs=[other_run / "checkpoints"], overwrite=True)


def test_a_held_lock_refuses_a_second_holder_and_goes_with_its_job(tmp_path):
    from pipeline.rundir import LOCK, RunLock, RunLockedError

    with RunLock(tmp_path / "run", command="first"):
        holder = json.loads((tmp_path / "run" / LOCK).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()} on host .* \\(first\\)"):
            RunLock(tmp_path / "run").acquire()
    assert not (tmp_path / "run" / LOCK).exists()
    with pytest.raises(KeyError):
        with RunLock(tmp_path / "run"):
            raise KeyError("an error in the job")
    assert not (tmp_path / "run" / LOCK).exists()


# -------------------------------------------------------------------------------- reports and --force


def test_report_commands_never_replace_a_file_they_did_not_write(tmp_path):
    """baselines, experiments and report refuse an --out holding something else, before any work."""
    notes = tmp_path / "notes.md"
    notes.write_text("# my notes\n")
    folder = tmp_path / "my_folder"
    folder.mkdir()
    (folder / "thesis.tex").write_text("chapter one\n")
    config = tmp_path / "tiny.yaml"
    config.write_text(f"name: tiny\ndata:\n  synthetic: {{n_users: 30, n_items: 25, images: false}}\n")
    before = digest(tmp_path)
    refused(run_cli(tmp_path, "baselines", "--out", notes),
            f"error: refusing to replace {notes}: it exists and is not a report written by `pipeline baselines` "
            f"(its first line is not `<!-- made by: python -m pipeline baselines ... -->`); choose another --out")
    refused(run_cli(tmp_path, "experiments", "--configs", config, "--seeds", 0, "--runs-dir", tmp_path / "runs",
                    "--out", notes),
            f"error: refusing to replace {notes}: it exists and is not a report written by `pipeline experiments`")
    refused(run_cli(tmp_path, "experiments", "--configs", config, "--seeds", 0, "--runs-dir", tmp_path / "runs",
                    "--out", config), f"error: refusing to write a report to {config}: it is the command's input")
    refused(run_cli(tmp_path, "report", tmp_path / "runs" / "tiny" / "seed-0", "--out", folder),
            f"error: refusing to replace {folder}: it exists and is not a report of trained runs written by "
            f"`pipeline report` (no report.md of its own)")
    assert digest(tmp_path) == before


def test_a_report_file_is_replaced_only_when_its_command_wrote_it(tmp_path):
    from pipeline.outputs import OutputError, check_report_file

    own = tmp_path / "baselines.md"
    own.write_text("<!-- made by: python -m pipeline baselines --out baselines.md -->\n# Trivial baselines\n")
    check_report_file(own, "baselines")  # its own earlier report: refreshed
    check_report_file(tmp_path / "new.md", "baselines")
    with pytest.raises(OutputError, match="is not a report written by `pipeline experiments`"):
        check_report_file(own, "experiments")  # another command's report
    table = tmp_path / "table.md"
    table.write_text("<!-- made by: python -m pipeline.report.cli --configs a.yaml -->\n")
    check_report_file(table, "experiments", programs=["python -m pipeline.report.cli"])
    with pytest.raises(OutputError, match="it is a folder"):
        check_report_file(tmp_path, "baselines")


def test_experiments_force_leaves_a_run_directory_a_job_is_writing(tmp_path):
    from pipeline.rundir import RunLock

    config = tmp_path / "tiny.yaml"
    config.write_text(f"name: tiny\ndata:\n  synthetic: {{n_users: 30, n_items: 25, images: false}}\n")
    run = tmp_path / "runs" / "tiny" / "seed-0"
    (run / "checkpoints" / "round-0").mkdir(parents=True)
    (run / "config.yaml").write_text("name: tiny\n")
    (run / "metrics.jsonl").write_text('{"round": 0}\n')
    with RunLock(run, command="a running job"):
        before = digest(run)
        done = run_cli(tmp_path, "experiments", "--configs", config, "--seeds", 0, "--runs-dir", tmp_path / "runs",
                       "--force")
        assert digest(run) == before
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert f"{run.resolve()} is being written by another job: pid {os.getpid()} on host {socket.gethostname()}" \
        in done.stdout + done.stderr


def test_experiments_set_aside_a_run_stopped_before_its_first_checkpoint(tmp_path):
    """A run stopped before its first round checkpoint (only checkpoints/best written) cannot be
    resumed: `experiments` moves its folder aside, whole, and starts the run again in its place."""
    from pipeline.report.experiments import set_aside_unresumable

    run = tmp_path / "fcf-gfmfr" / "seed-0"
    (run / "checkpoints" / "best").mkdir(parents=True)
    (run / "checkpoints" / "best" / "global.pt").write_bytes(b"state")
    (run / "metrics.jsonl").write_text('{"round": 0}\n')
    said = []
    set_aside_unresumable(run, said.append)
    assert not run.exists()
    (aside,) = (tmp_path / "fcf-gfmfr").iterdir()
    assert aside.name.startswith("seed-0.unresumable-")
    assert (aside / "checkpoints" / "best" / "global.pt").read_bytes() == b"state"
    assert (aside / "metrics.jsonl").read_text() == '{"round": 0}\n'
    assert str(aside) in said[0]
    empty = tmp_path / "new" / "seed-0"
    empty.mkdir(parents=True)
    set_aside_unresumable(empty, said.append)  # nothing to set aside: left as it is
    assert empty.is_dir() and len(said) == 1
