"""cluster.yaml against the Ray cluster launcher's own schema and the project's rules for cloud
nodes (S3 credentials, a CUDA 13 driver, the pinned project image); the Dockerfile; job
entrypoints' --help.

``cluster_problems(cfg)`` is the rule checker: every node type has an IAM instance profile
(S3 on workers too, not only the head), a pinned ``ami-...`` ImageId (the launcher's default AMI
is CUDA 11 era; torch 2.14.1's cu13 wheels need driver >= 580), a docker image with a fixed tag
(not ``:latest``), and no ``pip install`` without ``--constraint constraints.txt``.
Nothing here starts Ray or reaches AWS.
"""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
BASE_IMAGE = "rayproject/ray:2.60.0-py311-gpu"
AMI_ID = re.compile(r"ami-[0-9a-f]{8}([0-9a-f]{9})?")
COMMAND_LISTS = ("initialization_commands", "setup_commands", "head_setup_commands",
                 "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")


def load_cluster(path: Path = ROOT / "cluster.yaml") -> dict:
    return yaml.safe_load(path.read_text())


# =============================================================================
# the rule checker
# =============================================================================
def image_tag_problem(image: str | None) -> str | None:
    """Why ``image`` is not pinned (no tag, ``:latest``), or None; ``@sha256:`` digests are pinned."""
    if not image:
        return "no image"
    if "@sha256:" in image:
        return None
    name = image.rsplit("/", 1)[-1]  # a registry host may carry a :port
    if ":" not in name:
        return f"{image!r} has no tag (= :latest)"
    if name.split(":", 1)[1] == "latest":
        return f"{image!r} is :latest"
    return None


def pip_without_constraints(command: str) -> bool:
    """True when ``command`` runs ``pip install`` without ``--constraint/-c constraints.txt``."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    parts: list[list[str]] = [[]]
    for token in lexer:  # split the shell line into simple commands at ; && || | ( )
        if token and set(token) <= set(";&|()"):
            parts.append([])
        else:
            parts[-1].append(token)
    for words in parts:
        if not any(w == "pip" or w.endswith(("/pip", "pip3")) for w in words) or "install" not in words:
            continue
        pinned = any(w in ("-c", "--constraint") and nxt.endswith("constraints.txt")
                     for w, nxt in zip(words, words[1:]))
        pinned |= any(w.startswith("--constraint=") and w.endswith("constraints.txt") for w in words)
        if not pinned:
            return True
    return False


def cluster_problems(cfg: dict) -> list[str]:
    """Everything in a launcher config that would stop a cloud run from training; [] = none."""
    problems = []
    nodes = cfg.get("available_node_types", {})
    for name, node in nodes.items():
        node_config = node.get("node_config", {})
        profile = node_config.get("IamInstanceProfile") or {}
        if not (profile.get("Arn") or profile.get("Name")):
            problems.append(f"{name}: no IamInstanceProfile (no S3 credentials on this node)")
        ami = node_config.get("ImageId")
        if not (isinstance(ami, str) and AMI_ID.fullmatch(ami)):
            problems.append(f"{name}: ImageId {ami!r} is not a pinned ami-... id "
                            "(the launcher's default AMI's driver cannot run CUDA 13)")
        node_docker = node.get("docker", {})
        for key in ("image", "worker_image", "head_image"):
            if key in node_docker and (why := image_tag_problem(node_docker[key])):
                problems.append(f"{name}: docker.{key}: {why}")
    docker = cfg.get("docker", {})
    for key in ("image", "head_image", "worker_image"):
        if key in docker and (why := image_tag_problem(docker[key])):
            problems.append(f"docker.{key}: {why}")
    if not any(docker.get(k) for k in ("image", "head_image", "worker_image")):
        problems.append("docker: no image (nodes would run the AMI's Python)")
    for key in COMMAND_LISTS:
        for command in cfg.get(key) or []:
            if pip_without_constraints(command):
                problems.append(f"{key}: {command!r} installs without --constraint constraints.txt")
    for name, node in nodes.items():
        for key in ("initialization_commands", "setup_commands", "worker_setup_commands"):
            for command in node.get(key) or []:
                if pip_without_constraints(command):
                    problems.append(f"{name}.{key}: {command!r} installs without --constraint constraints.txt")
    return problems


# =============================================================================
# tests
# =============================================================================
def test_cluster_yaml_valid_against_launcher_schema():
    cfg = load_cluster()
    validate_config(prepare_config(copy.deepcopy(cfg)))
    nodes = cfg["available_node_types"]
    assert nodes[cfg["head_node_type"]]["resources"] == {"CPU": 0}, "the head must run no training"
    assert "--num-cpus=0" in " ".join(cfg["head_start_ray_commands"])
    assert {"gpu_worker", "cpu_worker"} <= set(nodes)
    assert re.fullmatch(r"[\w.\-/]+/dncut:\d+\.\d+\.\d+", cfg["docker"]["image"]), cfg["docker"]["image"]
    assert cfg["idle_timeout_minutes"] > 0 and all("max_workers" in nodes[n] for n in ("gpu_worker", "cpu_worker"))


def test_shipped_cluster_yaml_has_no_problems():
    assert cluster_problems(load_cluster()) == []


def _drop_profile_cpu(cfg):
    del cfg["available_node_types"]["cpu_worker"]["node_config"]["IamInstanceProfile"]


def _drop_ami_gpu(cfg):
    del cfg["available_node_types"]["gpu_worker"]["node_config"]["ImageId"]


def _image_latest(cfg):
    cfg["docker"]["image"] = cfg["docker"]["image"].rsplit(":", 1)[0] + ":latest"


def _image_untagged(cfg):
    cfg["docker"]["image"] = cfg["docker"]["image"].rsplit(":", 1)[0]


def _pip_unconstrained(cfg):
    cfg["setup_commands"] = ["pip install --quiet -e /home/ray/dncut"]


def _pip_unconstrained_in_chain(cfg):
    cfg["setup_commands"] = ["cd /home/ray/dncut && pip install -c constraints.txt . && pip install boto3"]


def _ami_from_ssm(cfg):  # resolved at launch: not pinned
    cfg["available_node_types"]["head"]["node_config"]["ImageId"] = (
        "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id")


@pytest.mark.parametrize("mutate, expect", [
    (_drop_profile_cpu, "cpu_worker: no IamInstanceProfile"),
    (_drop_ami_gpu, "gpu_worker: ImageId None"),
    (_ami_from_ssm, "head: ImageId 'resolve:ssm"),
    (_image_latest, "is :latest"),
    (_image_untagged, "has no tag"),
    (_pip_unconstrained, "setup_commands: 'pip install --quiet -e"),
    (_pip_unconstrained_in_chain, "pip install boto3"),
], ids=lambda v: getattr(v, "__name__", "")[1:] or None)
def test_cluster_problems_reports_each_mutation(mutate, expect):
    cfg = load_cluster()
    mutate(cfg)
    problems = cluster_problems(cfg)
    assert len(problems) == 1 and expect in problems[0], problems
    validate_config(prepare_config(copy.deepcopy(cfg)))  # the launcher's schema lets all of them pass


def test_constrained_pip_install_is_allowed():
    cfg = load_cluster()
    cfg["setup_commands"] = ["pip install --constraint /home/ray/dncut/constraints.txt -e /home/ray/dncut",
                             "pip install -c constraints.txt ."]
    assert cluster_problems(cfg) == []


def test_schema_rejects_a_broken_cluster_yaml():
    cfg = load_cluster()
    cfg["available_node_types"]["gpu_worker"]["min_wokers"] = 1  # typo must be caught by the schema
    with pytest.raises(Exception, match="min_wokers"):
        validate_config(prepare_config(cfg))


# =============================================================================
# Dockerfile
# =============================================================================
def dockerfile_instructions(path: Path = ROOT / "Dockerfile") -> list[tuple[str, str]]:
    """``[(INSTRUCTION, arguments)]`` with comments dropped and ``\\`` continuations joined."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        if not current and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        lines.append(current + raw)
        current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in lines]


def dockerfile_problems(instructions: list[tuple[str, str]]) -> list[str]:
    problems = []
    froms = [args for op, args in instructions if op == "FROM"]
    if froms != [BASE_IMAGE]:
        problems.append(f"FROM {froms}, expected [{BASE_IMAGE!r}]")
    runs = [args for op, args in instructions if op == "RUN"]
    if not any("pip install" in r for r in runs):
        problems.append("no pip install of dncut")
    problems += [f"RUN {r!r} installs without --constraint constraints.txt" for r in runs if pip_without_constraints(r)]
    workdirs = [args for op, args in instructions if op == "WORKDIR"]
    if not workdirs or not any(op == "COPY" and args.split()[-2:] == [".", "."] for op, args in instructions):
        problems.append("the repository is not copied into the WORKDIR")
    return problems


def test_dockerfile_base_image_and_constrained_install():
    instructions = dockerfile_instructions()
    assert dockerfile_problems(instructions) == []
    assert (ROOT / "constraints.txt").is_file()
    assert any("jobs/train.py --config configs/train/vits16_dino.yaml" in line
               for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("#"))
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", "outputs", ".git", "**/__pycache__", "**/*.pth", "data"} <= ignored


@pytest.mark.parametrize("old, new, expect", [
    ("FROM rayproject/ray:2.60.0-py311-gpu", "FROM rayproject/ray:latest-gpu", "FROM"),
    ("--constraint constraints.txt -r /tmp/requirements.txt", "-r /tmp/requirements.txt", "installs without"),
    ("pip install --no-cache-dir --constraint constraints.txt . \\", "pip install --no-cache-dir . \\",
     "installs without"),
    ("COPY --chown=ray:users . .", "COPY --chown=ray:users dncut dncut", "not copied"),
])
def test_dockerfile_problems_catch_a_broken_dockerfile(tmp_path, old, new, expect):
    text = (ROOT / "Dockerfile").read_text()
    assert old in text
    (tmp_path / "Dockerfile").write_text(text.replace(old, new))
    problems = dockerfile_problems(dockerfile_instructions(tmp_path / "Dockerfile"))
    assert len(problems) == 1 and expect in problems[0], problems


@pytest.mark.parametrize("job", ["train", "evaluate", "sweep"])
def test_job_entrypoints_help(job):
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / f"{job}.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--config" in out.stdout and "--set" in out.stdout
