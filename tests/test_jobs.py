"""``ray job submit`` of ``jobs/train.py`` to a real ``ray start --head`` cluster with token authentication.

    ray start --head --block (own temp dir, free ports, 2 CPUs, RAY_AUTH_MODE=token + a token file)
      -> a client without the token is refused (HTTP 401), one with a wrong token too (403)
      -> ray job submit --working-dir <repo> -- python jobs/train.py --config smoke.yaml --set ...
         ends SUCCEEDED with a checkpoint, the exported backbone and config.yaml in output_dir

The token lives in a temporary file named by ``RAY_AUTH_TOKEN_PATH`` (never ``~/.ray/auth_token``,
which other Ray users of this machine share). Teardown stops only this cluster: ``ray stop`` would
stop every Ray on the machine, so the ``ray start --block`` process group is terminated instead.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from bench import s3server
from dncut.train import STATE_FILE

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")

pytestmark = [pytest.mark.ray, pytest.mark.slow]

_RAY_CLIENT_VARS = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def _base_env(home: str) -> dict[str, str]:
    """This environment without any Ray address or token; ``python`` is the venv's; a private HOME."""
    env = {k: v for k, v in os.environ.items() if k not in _RAY_CLIENT_VARS}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["HOME"] = home  # no ~/.ray/auth_token of another Ray user can leak in
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def _http_status(url: str, headers: dict[str, str] | None = None) -> int | None:
    """HTTP status of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None


class TokenCluster:
    """A ``ray start --head --block`` subprocess in its own session (process group)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.token = secrets.token_hex(32)
        self.token_file = os.path.join(root, "auth_token")
        with open(os.open(self.token_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as handle:
            handle.write(self.token)
        self.home = os.path.join(root, "home")
        os.mkdir(self.home)
        self.dashboard_port = s3server.free_port()
        self.url = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {**_base_env(self.home), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_file}
        self.log_path = os.path.join(root, "ray-start.log")
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> None:
        ports = {flag: s3server.free_port() for flag in (
            "--port", "--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
            "--runtime-env-agent-port", "--metrics-export-port", "--node-manager-port", "--object-manager-port")}
        cmd = [RAY, "start", "--head", "--block", "--num-cpus=2", f"--temp-dir={self.root}",
               "--node-ip-address=127.0.0.1", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={self.dashboard_port}", "--object-store-memory=200000000",
               "--disable-usage-stats", *(f"{flag}={port}" for flag, port in ports.items())]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(cmd, env=self.env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}:\n{self.log_tail()}")
            if _http_status(f"{self.url}/api/version", self.auth_header()) == 200:
                return
            time.sleep(1.0)
        raise RuntimeError(f"the Ray dashboard did not answer within {timeout} s:\n{self.log_tail()}")

    def auth_header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def ray_cli(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120.0):
        """Run ``ray <args>`` as a client (default: with this cluster's token)."""
        return subprocess.run([RAY, *args], env=env or self.env, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def job_info(self, submission_id: str) -> dict:
        """The job's record from the REST API (``GET /api/jobs/<id>``, with the token)."""
        request = urllib.request.Request(f"{self.url}/api/jobs/{submission_id}", headers=self.auth_header())
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.loads(resp.read())

    def stop(self) -> None:
        """Terminate this cluster's process group only: SIGTERM, then SIGKILL after 3 s (the test is
        over: nothing of the cluster's needs a clean exit)."""
        if self.process is None:
            return
        pgid = self.process.pid  # start_new_session: the ray start process leads the group
        for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                self.process.poll()  # reap the leader, or the group never looks empty
                if not _group_alive(pgid):
                    return
                time.sleep(0.5)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-n:]
        except OSError:
            return "<no log>"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture(scope="module")
def token_cluster():
    root = tempfile.mkdtemp(prefix="rayj-", dir="/tmp")  # short: Ray's unix socket paths must stay < 108 chars
    cluster = TokenCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_client_without_token_is_refused(token_cluster):
    assert _http_status(f"{token_cluster.url}/api/jobs/") == 401
    assert _http_status(f"{token_cluster.url}/api/jobs/", {"Authorization": "Bearer " + "0" * 64}) == 403
    assert _http_status(f"{token_cluster.url}/api/jobs/", token_cluster.auth_header()) == 200

    anonymous = _base_env(token_cluster.home)
    denied = token_cluster.ray_cli("job", "list", "--address", token_cluster.url, env=anonymous)
    assert denied.returncode != 0
    assert "Authentication required" in denied.stdout + denied.stderr
    wrong = {**anonymous, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "f" * 64}
    denied = token_cluster.ray_cli("job", "list", "--address", token_cluster.url, env=wrong)
    assert denied.returncode != 0
    assert "Authentication failed" in denied.stdout + denied.stderr
    allowed = token_cluster.ray_cli("job", "list", "--address", token_cluster.url)
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr


def test_job_submit_train_smoke_succeeds(token_cluster, tmp_path):
    out = tmp_path / "runs"
    sid = f"dncut-smoke-{secrets.token_hex(4)}"
    submit = token_cluster.ray_cli(
        "job", "submit", "--address", token_cluster.url, "--submission-id", sid, "--working-dir", str(REPO),
        "--", "python", "jobs/train.py", "--config", "configs/train/smoke.yaml",
        "--set", f"output_dir={out}", "--set", "train.max_steps=2", "--set", "train.checkpoint_every=2",
        "--set", "train.val_every=null", "--set", "data.val_scenes=2", "--set", "data.num_scenes=8",
        timeout=600)
    logs = submit.stdout + submit.stderr
    assert submit.returncode == 0, logs[-6000:]
    assert token_cluster.job_info(sid)["status"] == "SUCCEEDED", logs[-6000:]

    run = out / "smoke"
    states = [torch.load(p, map_location="cpu", weights_only=True) for p in run.glob(f"*/checkpoint_*/{STATE_FILE}")]
    assert [int(s["step"]) for s in states] == [2]
    assert (run / "backbone.pth").is_file() and (run / "config.yaml").is_file()
    assert f"output_dir: {out}" in (run / "config.yaml").read_text()
