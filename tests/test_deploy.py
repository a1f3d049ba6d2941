"""deploy/kuberay/: the RayJob manifests against KubeRay's own CRD schema, and what dncut needs
of them (head with no CPUs, a GPU and a CPU worker group, IRSA service account on every pod,
token authentication, clean-up after the job, the project image, entrypoints whose job script
and config exist and load).

The CRDs (KubeRay v1.7.0) are read from ../shared/kuberay (next to ``DNCUT_SHARED_DATA``, the
variable the benches use for ../shared/data); the schema tests skip when they are absent.
Kubernetes' ``x-kubernetes-*`` keywords and ``int32``/``int64`` formats are ignored by the
Draft 7 validator (CEL rules are not evaluated); unknown fields are rejected as
``kubectl apply`` (strict field validation) does.
"""

from __future__ import annotations

import copy
import os
import shlex
from pathlib import Path

import pytest
import yaml

from dncut.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kuberay"
SHARED_DATA = Path(os.environ.get("DNCUT_SHARED_DATA", ROOT.parent / "shared" / "data"))
CRD_DIR = SHARED_DATA.parent / "kuberay"
JOBS = {  # manifest -> (job script, config)
    "rayjob-train.yaml": ("jobs/train.py", "configs/train/vits16_dino.yaml"),
    "rayjob-sweep.yaml": ("jobs/sweep.py", "configs/sweep/paper.yaml"),
    "rayjob-eval.yaml": ("jobs/evaluate.py", "configs/eval/paper.yaml"),
}


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def load_rayjob(name: str) -> dict:
    jobs = [d for d in load_docs(DEPLOY / name) if d.get("kind") == "RayJob"]
    assert len(jobs) == 1, f"{name}: expected one RayJob, found {len(jobs)}"
    return jobs[0]


def pod_templates(job: dict) -> list[tuple[str, dict]]:
    """``[(group name, pod spec)]``: the head first, then every worker group."""
    cluster = job["spec"]["rayClusterSpec"]
    return [("head", cluster["headGroupSpec"]["template"]["spec"])] + [
        (g["groupName"], g["template"]["spec"]) for g in cluster.get("workerGroupSpecs", [])]


def gpus(pod_spec: dict) -> int:
    return sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in pod_spec["containers"])


def parse_entrypoint(entrypoint: str) -> tuple[str, str, list[str]]:
    """``python jobs/X.py --config Y [--set k=v ...]`` -> ``("jobs/X.py", "Y", ["k=v", ...])``."""
    words = shlex.split(entrypoint)
    assert words[0] in ("python", "python3") and words[1].startswith("jobs/"), words
    config, overrides, rest = None, [], words[2:]
    while rest:
        flag, value, rest = rest[0], rest[1], rest[2:]
        if flag == "--config":
            config = value
        elif flag == "--set":
            overrides.append(value)
        else:
            raise AssertionError(f"unexpected argument {flag!r} in {entrypoint!r}")
    assert config, entrypoint
    return words[1], config, overrides


# =============================================================================
# the CRD schema
# =============================================================================
def strict(schema):
    """Copy of an OpenAPI schema where objects with ``properties`` reject unknown fields."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if isinstance(schema.get("properties"), dict) and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def rayjob_validator():
    jsonschema = pytest.importorskip("jsonschema")
    crd_path = CRD_DIR / "ray.io_rayjobs.yaml"
    if not crd_path.is_file():
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR} (../shared/kuberay; or set DNCUT_SHARED_DATA)")
    crd = yaml.safe_load(crd_path.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def schema_errors(validator, doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


@pytest.mark.parametrize("name", sorted(JOBS))
def test_rayjob_valid_against_crd(rayjob_validator, name):
    job = load_rayjob(name)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert schema_errors(rayjob_validator, job) == []


def _set(path, value):
    def mutate(job):
        node = job
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    mutate.__name__ = ".".join(map(str, path))
    return mutate


def _delete(path):
    def mutate(job):
        node = job
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    mutate.__name__ = "del " + ".".join(map(str, path))
    return mutate


GPU = ["spec", "rayClusterSpec", "workerGroupSpecs", 0]


@pytest.mark.parametrize("mutate, where", [
    (_set(["spec", "shutdownAfterJobFinishes"], "yes"), "spec.shutdownAfterJobFinishes"),
    (_set(["spec", "shutdownAfterJobFinish"], True), "spec"),                        # typo: unknown field
    (_set(["spec", "ttlSecondsAfterFinished"], "10m"), "spec.ttlSecondsAfterFinished"),
    (_set(["spec", "rayClusterSpec", "authOptions", "mode"], "password"), "spec.rayClusterSpec.authOptions.mode"),
    (_set(["spec", "rayClusterSpec", "headGroupSpec", "rayStartParams", "num-cpus"], 0),
     "spec.rayClusterSpec.headGroupSpec.rayStartParams.num-cpus"),                  # must be a string
    (_delete(GPU + ["groupName"]), "spec.rayClusterSpec.workerGroupSpecs.0"),         # required
    (_set(GPU + ["template", "spec", "containers", 0, "resources", "limits", "nvidia.com/gpu"], "four"),
     "spec.rayClusterSpec.workerGroupSpecs.0.template.spec.containers.0.resources.limits.nvidia.com/gpu"),
], ids=lambda v: getattr(v, "__name__", None))
def test_crd_schema_rejects_broken_manifest(rayjob_validator, mutate, where):
    job = copy.deepcopy(load_rayjob("rayjob-train.yaml"))
    mutate(job)
    errors = schema_errors(rayjob_validator, job)
    assert errors and all(e.startswith(where + ":") for e in errors), errors


# =============================================================================
# what dncut needs of the manifests (no CRDs needed)
# =============================================================================
def service_account() -> dict:
    (sa,) = [d for d in load_docs(DEPLOY / "serviceaccount.yaml") if d.get("kind") == "ServiceAccount"]
    return sa


def test_service_account_for_irsa():
    sa = service_account()
    assert sa["apiVersion"] == "v1" and sa["metadata"]["name"]
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")


def rayjob_problems(job: dict, image: str, workdir: str, account: str) -> list[str]:
    spec, problems = job["spec"], []
    cluster = spec["rayClusterSpec"]
    if cluster["headGroupSpec"].get("rayStartParams", {}).get("num-cpus") != "0":
        problems.append("head: rayStartParams num-cpus is not \"0\" (work would run on the head)")
    groups = pod_templates(job)[1:]
    if not any(gpus(pod) > 0 for _, pod in groups):
        problems.append("no worker group with nvidia.com/gpu limits")
    if not any(gpus(pod) == 0 for _, pod in groups):
        problems.append("no CPU worker group for Ray Data")
    for group, pod in pod_templates(job):
        if pod.get("serviceAccountName") != account:
            problems.append(f"{group}: serviceAccountName {pod.get('serviceAccountName')!r} != {account!r}")
        for c in pod["containers"]:
            if c.get("image") != image:
                problems.append(f"{group}: image {c.get('image')!r} != cluster.yaml's {image!r}")
            if c.get("workingDir", workdir) != workdir:
                problems.append(f"{group}: workingDir {c.get('workingDir')!r} != the Dockerfile's {workdir!r}")
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("shutdownAfterJobFinishes is not true (the cluster outlives the job)")
    if not spec.get("ttlSecondsAfterFinished", 0) > 0:
        problems.append("ttlSecondsAfterFinished not set")
    if cluster.get("authOptions", {}).get("mode") != "token":
        problems.append("authOptions.mode is not token")
    if spec.get("submissionMode") not in ("SidecarMode", "HTTPMode", "K8sJobMode"):
        problems.append(f"submissionMode {spec.get('submissionMode')!r} not chosen")
    if spec.get("submissionMode") == "SidecarMode" and \
            cluster["headGroupSpec"]["template"]["spec"].get("restartPolicy") != "Never":
        problems.append("SidecarMode needs the head pod's restartPolicy: Never")
    if not spec.get("activeDeadlineSeconds", 0) > 0:
        problems.append("activeDeadlineSeconds not set (a hung job would hold its GPUs forever)")
    if not isinstance(spec.get("backoffLimit"), int):
        problems.append("backoffLimit not set")
    return problems


def expected_image_and_workdir() -> tuple[str, str]:
    image = yaml.safe_load((ROOT / "cluster.yaml").read_text())["docker"]["image"]
    workdirs = [line.split(None, 1)[1].strip() for line in (ROOT / "Dockerfile").read_text().splitlines()
                if line.startswith("WORKDIR")]
    return image, workdirs[-1]


@pytest.mark.parametrize("name", sorted(JOBS))
def test_rayjob_structure(name):
    image, workdir = expected_image_and_workdir()
    job = load_rayjob(name)
    assert rayjob_problems(job, image, workdir, service_account()["metadata"]["name"]) == []


@pytest.mark.parametrize("mutate, expect", [
    (_set(["spec", "rayClusterSpec", "headGroupSpec", "rayStartParams"], {}), "num-cpus"),
    (_delete(GPU + ["template", "spec", "serviceAccountName"]), "gpu: serviceAccountName None"),
    (_set(["spec", "shutdownAfterJobFinishes"], False), "shutdownAfterJobFinishes"),
    (_set(GPU + ["template", "spec", "containers", 0, "image"], "rayproject/ray:2.60.0-py311-gpu"), "gpu: image"),
    (_delete(GPU + ["template", "spec", "containers", 0, "resources", "limits", "nvidia.com/gpu"]),
     "no worker group with nvidia.com/gpu"),
    (_delete(["spec", "rayClusterSpec", "authOptions"]), "authOptions"),
    (_delete(["spec", "submissionMode"]), "submissionMode"),
    (_delete(["spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "restartPolicy"]), "restartPolicy"),
    (_delete(["spec", "activeDeadlineSeconds"]), "activeDeadlineSeconds"),
    (_delete(["spec", "backoffLimit"]), "backoffLimit"),
], ids=lambda v: getattr(v, "__name__", None))
def test_rayjob_problems_catch_a_broken_manifest(mutate, expect):
    image, workdir = expected_image_and_workdir()
    job = copy.deepcopy(load_rayjob("rayjob-train.yaml"))
    mutate(job)
    problems = rayjob_problems(job, image, workdir, service_account()["metadata"]["name"])
    assert len(problems) == 1 and expect in problems[0], problems


@pytest.mark.parametrize("name", sorted(JOBS))
def test_entrypoint_job_and_config_load(name):
    script, config, overrides = parse_entrypoint(load_rayjob(name)["spec"]["entrypoint"])
    assert (script, config) == JOBS[name]
    assert (ROOT / script).is_file()
    cfg = load_config(ROOT / config, overrides)
    for item in overrides:  # every override reached the config
        key, _, raw = item.partition("=")
        value = cfg.model_dump(mode="json")
        for part in key.split("."):
            value = value[int(part)] if isinstance(value, list) else value[part]
        assert value == yaml.safe_load(raw), item
    assert cfg.output_dir.startswith("s3://"), "a RayJob's pods are deleted after the job: outputs go to S3"


def test_entrypoint_parser_rejects_other_arguments():
    with pytest.raises(AssertionError):
        parse_entrypoint("python jobs/train.py --config configs/train/smoke.yaml --address auto")
