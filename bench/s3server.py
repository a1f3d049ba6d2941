"""A real S3 endpoint for tests and benches: moto in server mode, in a subprocess.

The server is a separate process speaking HTTP on 127.0.0.1, so everything
started later (pyarrow, boto3, Ray workers in other processes) reaches it the
same way it would reach MinIO or AWS. Nothing here is mocked in-process.

Used by ``tests/conftest.py`` (fixtures ``s3_server``, ``s3_image_bucket``,
``s3_bucket``), importable by any test as ``from bench import s3server`` and by a bench
script as ``import s3server``.
"""

from __future__ import annotations

import dataclasses
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

FAKE_ACCESS_KEY = "dncut-test-access-key"
FAKE_SECRET_KEY = "dncut-test-SECRET-do-not-print"
"""Fake credentials; tests assert the secret never appears in an error message."""
REGION = "us-east-1"

IMAGE_BUCKET = "dncut-test-images"
IMAGE_PREFIX = "train"
N_IMAGES = 8
CORRUPT_NAME = "corrupt.jpg"
"""The image bucket holds N_IMAGES decodable JPEGs ``img_<i>.jpg`` plus one CORRUPT_NAME (random bytes)."""

AWS_VARS_TO_CLEAR = ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL_S3",
                     "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                     "AWS_CONTAINER_CREDENTIALS_FULL_URI")
"""Variables that could make boto3 / pyarrow pick up credentials or endpoints other than the test ones."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now (also usable as a closed port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclasses.dataclass
class S3Server:
    """A running moto server.

    Attributes:
        endpoint_url: ``http://127.0.0.1:<port>``.
        process: the server subprocess.
        log_path: file receiving the server's output.
        client: boto3 S3 client with the fake credentials (works even if a test clears the env).
    """

    endpoint_url: str
    process: subprocess.Popen
    log_path: str
    client: Any = None

    def make_client(self) -> Any:
        """A new boto3 S3 client bound to this server with the fake credentials."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=FAKE_ACCESS_KEY,
            aws_secret_access_key=FAKE_SECRET_KEY,
        )

    def stop(self, keep_log: bool = False) -> None:
        """Terminate the server process (kill after 10 s) and remove its log unless ``keep_log``."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if not keep_log and os.path.exists(self.log_path):
            os.remove(self.log_path)


def _die_with_parent() -> None:
    """In the child: ask Linux to SIGTERM the server if the test process dies without teardown."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: rely on teardown


def _wait_ready(url: str, process: subprocess.Popen, timeout: float) -> bool:
    """Poll ``url`` until it answers HTTP; False if the process died or time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=1.0):
                return True
        except urllib.error.HTTPError:
            return True  # any HTTP answer means the server is up
        except OSError:
            time.sleep(0.1)
    return False


def start_moto_server(host: str = "127.0.0.1", timeout: float = 30.0, attempts: int = 3) -> S3Server:
    """Start ``python -m moto.server`` on a free port of ``host`` and wait until it answers.

    Args:
        host: loopback address to bind.
        timeout: seconds to wait for the server per attempt.
        attempts: tries with a new port (a port can be taken between choosing and binding).

    Returns:
        The running server, with ``client`` set.
    """
    for _ in range(attempts):
        port = free_port(host)
        log = tempfile.NamedTemporaryFile(prefix="moto-server-", suffix=".log", delete=False)
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        log.close()
        server = S3Server(f"http://{host}:{port}", process, log.name)
        if _wait_ready(server.endpoint_url, process, timeout):
            server.client = server.make_client()
            return server
        server.stop(keep_log=True)
    with open(log.name, encoding="utf-8", errors="replace") as handle:
        tail = handle.read()[-2000:]
    raise RuntimeError(f"moto server did not start after {attempts} attempts; last log:\n{tail}")


def aws_test_env(endpoint_url: str, scratch_dir: str) -> dict[str, str]:
    """Environment that points boto3 / pyarrow at the test server and nowhere else.

    Shared config files point to a missing file in ``scratch_dir`` and the EC2
    metadata service is disabled, so no real credentials can be picked up.

    Args:
        endpoint_url: the moto server.
        scratch_dir: an empty temporary folder.

    Returns:
        Variable -> value to set (see also ``AWS_VARS_TO_CLEAR``).
    """
    missing = os.path.join(scratch_dir, "no-such-aws-file")
    return {
        "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_KEY,
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_SHARED_CREDENTIALS_FILE": missing,
        "AWS_CONFIG_FILE": missing,
    }


def make_jpeg(seed: int, width: int = 80, height: int = 64, quality: int = 90) -> bytes:
    """A small RGB JPEG: a bright ellipse (the "object") on a darker noisy background.

    Args:
        seed: RNG seed (colours, position, noise).
        width: image width.
        height: image height.
        quality: JPEG quality.

    Returns:
        The encoded JPEG.
    """
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 90, size=(height, width, 3), dtype=np.uint8)  # (H, W, 3)
    image = Image.fromarray(background, mode="RGB")
    cx, cy = rng.uniform(0.35, 0.65) * width, rng.uniform(0.35, 0.65) * height
    rx, ry = rng.uniform(0.15, 0.3) * width, rng.uniform(0.15, 0.3) * height
    colour = tuple(int(c) for c in rng.integers(150, 256, size=3))
    ImageDraw.Draw(image).ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def populate_image_bucket(client: Any, bucket: str = IMAGE_BUCKET, prefix: str = IMAGE_PREFIX,
                          n_images: int = N_IMAGES) -> str:
    """Create ``bucket`` with ``n_images`` JPEGs and one corrupt ``.jpg`` under ``prefix``.

    Args:
        client: boto3 S3 client.
        bucket: bucket to create.
        prefix: key prefix (folder).
        n_images: number of decodable JPEGs (sizes vary between 64 and 127 px).

    Returns:
        ``s3://bucket/prefix``.
    """
    client.create_bucket(Bucket=bucket)
    for i in range(n_images):
        body = make_jpeg(seed=i, width=64 + 9 * i, height=64 + 5 * i)
        client.put_object(Bucket=bucket, Key=f"{prefix}/img_{i}.jpg", Body=body)
    junk = np.random.default_rng(1234).integers(0, 256, size=2048, dtype=np.uint8).tobytes()
    client.put_object(Bucket=bucket, Key=f"{prefix}/{CORRUPT_NAME}", Body=junk)
    return f"s3://{bucket}/{prefix}"
