"""cluster.yaml passes the Ray autoscaler's own preparation and schema validation, and keeps
token authentication on with the dashboard on loopback."""

from __future__ import annotations

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[2]


def test_cluster_yaml_is_valid_for_the_autoscaler():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    prepared = prepare_config(config)
    validate_config(prepared)  # raises on any schema violation
    assert prepared["head_node_type"] in prepared["available_node_types"]
    workers = prepared["available_node_types"]["ray.worker.gpu"]
    assert workers["min_workers"] == 0 and workers["max_workers"] >= 1  # autoscaling GPU workers
    for node_type in prepared["available_node_types"].values():
        assert node_type["node_config"]["InstanceType"].startswith("g")  # GPU instances


def test_cluster_keeps_authentication_on_and_the_dashboard_private():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if " start " in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)
    assert "--dashboard-host=127.0.0.1" in starts[0]
    assert "~/.ray/auth_token" in config["file_mounts"]  # one token on every node
    text = (REPO / "cluster.yaml").read_text()
    assert "RAY_AUTH_MODE=disabled" not in text and "0.0.0.0" not in text
    assert any("pip install" in c and "-e ." in c for c in config["setup_commands"])  # installs the project
