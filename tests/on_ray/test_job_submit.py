"""End to end: a local Ray head with its dashboard (token authentication on), the real
`ray job submit` of jobs/train.py, SUCCEEDED, and the job's metrics file read back.

The head runs as `ray start --head --block` in its own process group, so the test stops
exactly that head (never `ray stop`, which would stop every Ray instance of the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """(dashboard address, environment holding the head's token)."""
    root = tmp_path_factory.mktemp("head")
    token_file = root / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    # as with an activated virtual environment: the job's `python` is this interpreter
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    gcs, dashboard = free_port(), free_port()
    # every port of the head its own: another Ray instance of the machine may hold the defaults
    ports = [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                     "metrics-export-port", "runtime-env-agent-port",
                                                     "node-manager-port", "object-manager-port")]
    process = subprocess.Popen([RAY, "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
                                "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                                f"--dashboard-port={dashboard}", *ports, f"--temp-dir={root / 'ray'}"],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        while True:  # the job API answers once the dashboard is up
            listed = subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True,
                                    text=True)
            if listed.returncode == 0:
                break
            if process.poll() is not None or time.time() > deadline:
                why = process.stderr.read() if process.poll() is not None else listed.stderr
                raise RuntimeError(f"the head did not come up: {why[-2000:]}")
            time.sleep(2)
        yield address, env
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def test_a_client_without_the_token_is_refused(head):
    address, env = head
    stranger = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    refused = subprocess.run([RAY, "job", "list", "--address", address], env=stranger, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode != 0
    wrong = dict(env, RAY_AUTH_TOKEN="0" * 64)
    assert subprocess.run([RAY, "job", "list", "--address", address], env=wrong, capture_output=True,
                          text=True, timeout=120).returncode != 0


def test_ray_job_submit_runs_the_train_job(head, tmp_path):
    address, env = head
    out = tmp_path / "run"
    command = [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
               "python", "jobs/train.py", "--out", str(out), "--json", "--set",
               "data.synthetic={n_users: 40, n_items: 30, images: false, seed: 1}", "model.backbone=fcf",
               "train.rounds=2", "train.local_epochs=1", "runtime.pools=2"]
    deadline = time.time() + 180
    while True:  # the head's job agent starts a little after the dashboard answers
        submitted = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent to submit job" not in submitted.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    job_id = next(line.split("'")[1] for line in submitted.stdout.splitlines() if "Job '" in line)
    status = subprocess.run([sys.executable, "-c", "import sys; from ray.job_submission import JobSubmissionClient; "
                             "print(JobSubmissionClient(sys.argv[1]).get_job_status(sys.argv[2]).value)",
                             address, job_id], env=env, capture_output=True, text=True, timeout=120)
    assert status.stdout.strip() == "SUCCEEDED", status.stdout + status.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert all(0.0 <= r["valid/hr@50"] <= 1.0 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_run"] == 2 and summary["pools"] == 2
