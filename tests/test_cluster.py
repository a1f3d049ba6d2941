"""cluster.yaml against the Ray cluster launcher's own schema; job entrypoints' --help."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def load_cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_valid_against_launcher_schema():
    cfg = load_cluster()
    validate_config(prepare_config(copy.deepcopy(cfg)))
    nodes = cfg["available_node_types"]
    assert nodes[cfg["head_node_type"]]["resources"] == {"CPU": 0}, "the head must run no training"
    assert {"gpu_worker", "cpu_worker"} <= set(nodes)
    assert cfg["docker"]["image"].startswith("rayproject/ray:") and cfg["docker"]["image"].endswith("-py311-gpu")
    assert cfg["idle_timeout_minutes"] > 0 and all("max_workers" in nodes[n] for n in ("gpu_worker", "cpu_worker"))
    assert any("pip install" in c and "dncut" in c for c in cfg["setup_commands"])


def test_schema_rejects_a_broken_cluster_yaml():
    cfg = load_cluster()
    cfg["available_node_types"]["gpu_worker"]["min_wokers"] = 1  # typo must be caught by the schema
    with pytest.raises(Exception, match="min_wokers"):
        validate_config(prepare_config(cfg))


@pytest.mark.parametrize("job", ["train", "evaluate", "sweep"])
def test_job_entrypoints_help(job):
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / f"{job}.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--config" in out.stdout and "--set" in out.stdout
