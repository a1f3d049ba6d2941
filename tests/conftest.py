"""Shared pytest fixtures."""

from __future__ import annotations

import itertools

import pytest

import s3server

# =============================================================================
# S3: a real moto server (subprocess, HTTP on 127.0.0.1) for the whole session
# =============================================================================
# s3_server        (session)  -> s3server.S3Server: .endpoint_url, .client (boto3);
#                               also sets AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
#                               AWS_ENDPOINT_URL / AWS_REGION for the rest of the session,
#                               so dncut.storage and later Ray workers reach it.
# s3_image_bucket  (session)  -> "s3://dncut-test-images/train": s3server.N_IMAGES JPEGs
#                               img_<i>.jpg + s3server.CORRUPT_NAME. Read-only: don't modify.
# s3_bucket        (function) -> "s3://<fresh empty bucket>" to write into.

_bucket_counter = itertools.count()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = s3server.start_moto_server()
    patch = pytest.MonkeyPatch()
    scratch = str(tmp_path_factory.mktemp("aws-config"))
    for name in s3server.AWS_VARS_TO_CLEAR:
        patch.delenv(name, raising=False)
    for name, value in s3server.aws_test_env(server.endpoint_url, scratch).items():
        patch.setenv(name, value)
    try:
        yield server
    finally:
        patch.undo()
        server.stop()


@pytest.fixture(scope="session")
def s3_image_bucket(s3_server) -> str:
    return s3server.populate_image_bucket(s3_server.client)


@pytest.fixture
def s3_bucket(s3_server) -> str:
    name = f"dncut-test-scratch-{next(_bucket_counter)}"
    s3_server.client.create_bucket(Bucket=name)
    return f"s3://{name}"
