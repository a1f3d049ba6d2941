"""dncut.storage on local folders and on a real (moto) S3 server."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time

import pytest

from bench import s3server
from dncut import storage
from dncut.storage import S3Options, StorageError


def _touch(path, data: bytes = b"x") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)


def _assert_no_secret(exc: BaseException) -> None:
    text = str(exc) + repr(exc.__cause__ or "")
    assert s3server.FAKE_SECRET_KEY not in text


# ----------------------------------------------------------------------------- URIs and options


def test_is_s3_split_and_join():
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/data/s3://x") and not storage.is_s3("b/k")
    assert storage.split_s3("s3://bucket/a/b.jpg") == ("bucket", "a/b.jpg")
    assert storage.split_s3("s3://bucket/a/") == ("bucket", "a")
    assert storage.split_s3("s3://bucket") == ("bucket", "")
    assert storage.join("s3://bucket/pre/", "/a/", "b.jpg") == "s3://bucket/pre/a/b.jpg"
    assert storage.join("s3://bucket", "a", "", "b") == "s3://bucket/a/b"
    assert storage.join("/data/x", "a", "b.jpg") == "/data/x/a/b.jpg"
    with pytest.raises(StorageError, match="no bucket"):
        storage.split_s3("s3:///key")


def test_unsupported_scheme_is_rejected():
    with pytest.raises(StorageError, match=r"unsupported URI scheme 'gs'"):
        storage.read_bytes("gs://bucket/key")


def test_s3_options_resolve_from_env_and_explicit_wins(monkeypatch):
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    assert S3Options().resolved() == S3Options(endpoint_url=None, region="us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    resolved = S3Options().resolved()
    assert (resolved.endpoint_url, resolved.region) == ("http://127.0.0.1:9000", "eu-west-3")
    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9001")
    resolved = S3Options().resolved()
    assert (resolved.endpoint_url, resolved.region) == ("http://127.0.0.1:9001", "eu-central-1")
    explicit = S3Options(endpoint_url="https://minio.local:9443", region="ap-south-1").resolved()
    assert (explicit.endpoint_url, explicit.region) == ("https://minio.local:9443", "ap-south-1")


def test_s3_options_pickle_and_validation():
    opts = S3Options(endpoint_url="http://127.0.0.1:5000", region="us-west-2", connect_timeout=1.5)
    assert pickle.loads(pickle.dumps(opts)) == opts
    with pytest.raises(ValueError, match="'ftp'"):
        S3Options(endpoint_url="ftp://host:21")
    with pytest.raises(ValueError, match="max_attempts"):
        S3Options(max_attempts=0)
    assert storage._split_endpoint("http://127.0.0.1:5000") == ("http", "127.0.0.1:5000")
    assert storage._split_endpoint("minio.example:9000") == ("https", "minio.example:9000")
    assert storage._redact_endpoint("http://user:pw@host:1") == "http://host:1"


# ----------------------------------------------------------------------------- local


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_the_mode_open_would_give(tmp_path, umask):
    """A file written by write_bytes (a temporary renamed into place) has the mode of a file made
    with open() under the same umask, not mkstemp's 0600."""
    old = os.umask(umask)
    try:
        storage.write_bytes(str(tmp_path / "ours.json"), b"{}")
        with open(tmp_path / "theirs.json", "wb"):
            pass
    finally:
        os.umask(old)
    assert (tmp_path / "ours.json").stat().st_mode & 0o777 == (tmp_path / "theirs.json").stat().st_mode & 0o777


def test_local_write_read_list_exists(tmp_path):
    root = str(tmp_path / "root")
    storage.write_bytes(os.path.join(root, "sub", "deep", "b.JPG"), b"bbb")
    storage.write_bytes(os.path.join(root, "a.png"), b"aa")
    storage.write_bytes(os.path.join(root, "notes.txt"), b"t")
    assert storage.read_bytes(os.path.join(root, "sub", "deep", "b.JPG")) == b"bbb"
    with open(os.path.join(root, "a.png"), "rb") as handle:  # independent read
        assert handle.read() == b"aa"
    expected_all = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(root) for f in fs)
    assert storage.list_files(root) == expected_all
    assert storage.list_files(root + "/", suffixes=(".jpg", ".png")) == [
        os.path.join(root, "a.png"),
        os.path.join(root, "sub", "deep", "b.JPG"),
    ]
    assert not any(".tmp-" in f for f in expected_all)
    assert storage.exists(root) and storage.exists(os.path.join(root, "a.png"))
    assert not storage.exists(os.path.join(root, "zzz"))
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(os.path.join(root, "zzz"))
    with pytest.raises(FileNotFoundError):
        storage.list_files(os.path.join(root, "zzz"))


def test_local_overwrite_replaces_content(tmp_path):
    path = str(tmp_path / "f.bin")
    storage.write_bytes(path, b"first-long-content")
    storage.write_bytes(path, b"2nd")
    assert open(path, "rb").read() == b"2nd"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_check_source_local(tmp_path):
    _touch(str(tmp_path / "imgs" / "x.jpg"))
    _touch(str(tmp_path / "imgs" / "y.txt"))
    assert storage.check_source(str(tmp_path / "imgs")) == [str(tmp_path / "imgs" / "x.jpg")]

    missing = str(tmp_path / "nope")
    with pytest.raises(StorageError, match="does not exist") as info:
        storage.check_source(missing)
    assert missing in str(info.value)

    (tmp_path / "empty").mkdir()
    with pytest.raises(StorageError, match="is empty") as info:
        storage.check_source(str(tmp_path / "empty"))
    assert str(tmp_path / "empty") in str(info.value)

    _touch(str(tmp_path / "texts" / "a.txt"))
    with pytest.raises(StorageError, match=r"1 file\(s\) but none ends with") as info:
        storage.check_source(str(tmp_path / "texts"))
    assert "a.txt" in str(info.value)

    with pytest.raises(StorageError, match="not a folder"):
        storage.check_source(str(tmp_path / "imgs" / "x.jpg"))


# ----------------------------------------------------------------------------- S3


def test_s3_roundtrip_against_boto3(s3_server, s3_bucket):
    bucket = storage.split_s3(s3_bucket)[0]
    uri = storage.join(s3_bucket, "dir", "sub", "f.bin")
    storage.write_bytes(uri, b"\x00\x01payload")
    body = s3_server.client.get_object(Bucket=bucket, Key="dir/sub/f.bin")["Body"].read()
    assert body == b"\x00\x01payload"

    s3_server.client.put_object(Bucket=bucket, Key="dir/a.PNG", Body=b"png")
    s3_server.client.put_object(Bucket=bucket, Key="dir/z.txt", Body=b"t")
    assert storage.read_bytes(f"{s3_bucket}/dir/a.PNG") == b"png"
    assert storage.list_files(storage.join(s3_bucket, "dir")) == [
        f"{s3_bucket}/dir/a.PNG",
        f"{s3_bucket}/dir/sub/f.bin",
        f"{s3_bucket}/dir/z.txt",
    ]
    assert storage.list_files(f"{s3_bucket}/dir/", suffixes=[".png"]) == [f"{s3_bucket}/dir/a.PNG"]
    assert storage.exists(uri) and storage.exists(f"{s3_bucket}/dir") and storage.exists(s3_bucket)
    assert not storage.exists(f"{s3_bucket}/dir/missing.bin")
    assert not storage.exists("s3://dncut-no-such-bucket/x")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{s3_bucket}/dir/missing.bin")


def test_s3_explicit_options_match_env(s3_server, s3_image_bucket, monkeypatch):
    keys = s3_server.client.list_objects_v2(Bucket=s3server.IMAGE_BUCKET)["Contents"]
    expected = sorted(f"s3://{s3server.IMAGE_BUCKET}/{k['Key']}" for k in keys)
    assert len(expected) == s3server.N_IMAGES + 1
    assert storage.list_files(s3_image_bucket) == expected
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    opts = S3Options(endpoint_url=s3_server.endpoint_url, region=s3server.REGION)
    assert storage.list_files(s3_image_bucket, suffixes=(".jpg",), s3=opts) == expected


def test_s3_reachable_from_another_process(s3_image_bucket):
    code = "from dncut import storage; import sys; print(len(storage.list_files(sys.argv[1])))"
    out = subprocess.run([sys.executable, "-c", code, s3_image_bucket], capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.strip() == str(s3server.N_IMAGES + 1)


def test_check_source_s3_ok(s3_image_bucket):
    files = storage.check_source(s3_image_bucket)
    assert len(files) == s3server.N_IMAGES + 1
    assert files[0] == f"{s3_image_bucket}/{s3server.CORRUPT_NAME}"


def test_check_source_s3_missing_bucket(s3_server):
    with pytest.raises(StorageError, match="bucket 'dncut-missing-bucket' does not exist") as info:
        storage.check_source("s3://dncut-missing-bucket/images")
    assert s3_server.endpoint_url in str(info.value)
    _assert_no_secret(info.value)


def test_check_source_s3_empty_prefix(s3_image_bucket):
    uri = f"s3://{s3server.IMAGE_BUCKET}/no-such-prefix"
    with pytest.raises(StorageError, match="is empty") as info:
        storage.check_source(uri)
    assert uri in str(info.value)
    _assert_no_secret(info.value)


def test_check_source_s3_unreachable_endpoint_fails_fast(s3_server):
    closed = f"http://127.0.0.1:{s3server.free_port()}"
    start = time.monotonic()
    with pytest.raises(StorageError, match="cannot reach the S3 endpoint") as info:
        storage.check_source("s3://some-bucket/images", s3=S3Options(endpoint_url=closed))
    assert time.monotonic() - start < 10.0
    assert closed in str(info.value) and "s3://some-bucket/images" in str(info.value)
    _assert_no_secret(info.value)


def test_check_source_s3_missing_credentials(s3_server, s3_image_bucket, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    # the session fixture already points the shared config files at a missing file and
    # disables the EC2 metadata service, so neither boto3 nor pyarrow can find other credentials
    assert not os.path.exists(os.environ["AWS_SHARED_CREDENTIALS_FILE"])
    assert os.environ["AWS_EC2_METADATA_DISABLED"] == "true"
    with pytest.raises(StorageError, match="no AWS credentials found") as info:
        storage.check_source(s3_image_bucket)
    assert s3_image_bucket in str(info.value)
    _assert_no_secret(info.value)


def test_anonymous_access_needs_no_credentials(s3_image_bucket, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    opts = S3Options(anonymous=True)
    assert len(storage.check_source(s3_image_bucket, s3=opts)) == s3server.N_IMAGES + 1


def test_named_profile_from_the_storage_config(s3_image_bucket, monkeypatch, tmp_path):
    from dncut.config import parse_config

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    creds = tmp_path / "credentials"
    creds.write_text(f"[research]\naws_access_key_id = {s3server.FAKE_ACCESS_KEY}\n"
                     f"aws_secret_access_key = {s3server.FAKE_SECRET_KEY}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    with pytest.raises(StorageError, match="storage.profile") as info:  # the default chain finds nothing
        storage.Storage().check_source(s3_image_bucket)
    assert "storage.anonymous: true" in str(info.value)
    store = parse_config({"storage": {"profile": "research"}}).storage_handle()
    assert store.options.profile == "research"
    assert len(store.check_source(s3_image_bucket)) == s3server.N_IMAGES + 1  # boto3's precheck
    assert len(store.list_files(s3_image_bucket)) == s3server.N_IMAGES + 1  # pyarrow's reads
    with pytest.raises(StorageError, match="storage.profile='nobody': no such profile"):
        parse_config({"storage": {"profile": "nobody"}}).storage_handle().check_source(s3_image_bucket)
    _assert_no_secret(info.value)


def test_anonymous_from_the_storage_config(s3_image_bucket, monkeypatch):
    from dncut.config import parse_config

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    store = parse_config({}, ["storage.anonymous=true"]).storage_handle()
    assert len(store.check_source(s3_image_bucket)) == s3server.N_IMAGES + 1
