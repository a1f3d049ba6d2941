"""Storage: one small API over local paths and ``s3://bucket/key`` URIs.

Every module that touches files (datasets, the Ray Data pipeline, checkpoints,
evaluation outputs) goes through this one, so that the same code runs on a
laptop folder and on an S3 bucket (AWS, MinIO, or the moto test server).

A URI is either a local path (absolute or relative, ``~`` expanded) or
``s3://bucket/key``. Any other ``scheme://`` is rejected.

S3 goes through :class:`pyarrow.fs.S3FileSystem`; boto3 is used only by
:func:`check_source`, a fast precheck run before any training worker starts.
Endpoint and region come from an :class:`S3Options` (carried by the config,
picklable for Ray workers) and fall back to the environment
(``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_REGION`` /
``AWS_DEFAULT_REGION``). Credentials always come from the standard AWS chain
(environment, shared config files, instance role); they are never passed
around, printed or put into an error message.

API::

    filesystem(uri) -> (pyarrow.fs.FileSystem, path)
    read_bytes(uri) -> bytes;  write_bytes(uri, data)
    list_files(uri, suffixes) -> list[str]   # full URIs, sorted, recursive
    exists(uri) -> bool;  join(uri, *parts) -> str;  is_s3(uri) -> bool
    check_source(uri) -> list[str]           # or StorageError with the cause
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

import pyarrow.fs as pafs

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
"""File suffixes treated as images (compared case-insensitively)."""

_S3_PREFIX = "s3://"
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_DEFAULT_REGION = "us-east-1"


class StorageError(ValueError):
    """A source or destination is unusable: the message names the URI and the cause."""


# ----------------------------------------------------------------------------- options


@dataclasses.dataclass(frozen=True)
class S3Options:
    """Where and how to reach S3; picklable, holds no secrets.

    Args:
        endpoint_url: e.g. ``"http://127.0.0.1:9000"`` for MinIO/moto; ``None``
            reads ``AWS_ENDPOINT_URL_S3`` then ``AWS_ENDPOINT_URL``, else AWS itself.
            Without a scheme, ``https`` is assumed.
        region: ``None`` reads ``AWS_REGION`` then ``AWS_DEFAULT_REGION``, else us-east-1.
        anonymous: unsigned requests (public buckets); no credentials needed.
        profile: a named profile of the AWS shared config / credentials files (as ``AWS_PROFILE``);
            ``None`` uses the default credential chain.
        connect_timeout: seconds to open a connection (keep small: fail fast).
        request_timeout: seconds for a request.
        max_attempts: attempts per request, retries included.
    """

    endpoint_url: str | None = None
    region: str | None = None
    anonymous: bool = False
    profile: str | None = None
    connect_timeout: float = 3.0
    request_timeout: float = 30.0
    max_attempts: int = 3

    def __post_init__(self) -> None:
        if self.connect_timeout <= 0 or self.request_timeout <= 0:
            raise ValueError(
                f"S3Options timeouts must be > 0, got connect_timeout={self.connect_timeout}, "
                f"request_timeout={self.request_timeout}"
            )
        if self.max_attempts < 1:
            raise ValueError(f"S3Options.max_attempts must be >= 1, got {self.max_attempts}")
        if self.endpoint_url:
            _split_endpoint(self.endpoint_url)  # validates

    def resolved(self) -> S3Options:
        """Return a copy with endpoint and region filled in from the environment.

        Returns:
            S3Options whose ``region`` is set and whose ``endpoint_url`` is set when
            the environment names one.
        """
        endpoint = (
            self.endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or None
        )
        region = (
            self.region
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or _DEFAULT_REGION
        )
        return dataclasses.replace(self, endpoint_url=endpoint, region=region)


def _split_endpoint(endpoint_url: str) -> tuple[str, str]:
    """``"http://host:9000"`` -> ``("http", "host:9000")``; no scheme means https."""
    if "://" not in endpoint_url:
        endpoint_url = "https://" + endpoint_url
    parts = urlsplit(endpoint_url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(
            f"S3 endpoint scheme must be one of ['http', 'https'], got {parts.scheme!r} "
            f"in {_redact_endpoint(endpoint_url)!r}"
        )
    if not parts.hostname:
        raise ValueError(f"S3 endpoint has no host: {_redact_endpoint(endpoint_url)!r}")
    if parts.path not in ("", "/"):
        raise ValueError(f"S3 endpoint must not have a path: {_redact_endpoint(endpoint_url)!r}")
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return parts.scheme, netloc


def _redact_endpoint(endpoint_url: str | None) -> str:
    """Endpoint for messages, without any ``user:password@`` part."""
    if not endpoint_url:
        return "the default AWS endpoint"
    return re.sub(r"//[^/@]*@", "//", endpoint_url)


# ----------------------------------------------------------------------------- URIs


def is_s3(uri: str) -> bool:
    """Whether ``uri`` is an ``s3://`` URI.

    Args:
        uri: local path or URI.

    Returns:
        True for ``s3://...``.
    """
    return uri.startswith(_S3_PREFIX)


def absolute(uri: str | None) -> str | None:
    """``uri`` as every process of a cluster reads it: a local path made absolute (``~`` expanded)
    against this process's working directory; a URI with a scheme (``s3://``, or another that the
    storage then refuses by name) and None as they are. The driver calls it once on what the user
    typed: Ray workers run in their own working directories.

    Args:
        uri: local path, URI or None.
    """
    if uri is None or _SCHEME_RE.match(uri):
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def _check_scheme(uri: str) -> None:
    match = _SCHEME_RE.match(uri)
    if match and match.group(1) != "s3":
        raise StorageError(
            f"unsupported URI scheme {match.group(1)!r} in {uri!r}: use a local path or s3://bucket/key"
        )


def split_s3(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/some/key`` into ``("bucket", "some/key")``.

    Args:
        uri: an ``s3://`` URI.

    Returns:
        (bucket, key) with the key's surrounding slashes removed ("" for the bucket root).
    """
    if not is_s3(uri):
        raise StorageError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len(_S3_PREFIX) :].partition("/")
    if not bucket:
        raise StorageError(f"no bucket in S3 URI {uri!r}: expected s3://bucket/key")
    return bucket, key.strip("/")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI.

    Local paths follow :func:`os.path.join`; for S3 every part is appended with
    one ``/`` (leading/trailing slashes of parts are dropped, empty parts skipped).

    Args:
        uri: base local path or ``s3://`` URI.
        *parts: path segments.

    Returns:
        The joined URI.
    """
    if not is_s3(uri):
        return os.path.join(uri, *parts)
    segments = [p.strip("/") for p in parts if p.strip("/")]
    return "/".join([uri.rstrip("/"), *segments])


def _has_suffix(path: str, suffixes: Sequence[str]) -> bool:
    return path.lower().endswith(tuple(s.lower() for s in suffixes))


# ----------------------------------------------------------------------------- filesystems


@functools.lru_cache(maxsize=8)
def _cached_s3_filesystem(opts: S3Options, credential_identity: tuple[str | None, ...]) -> pafs.S3FileSystem:
    """One S3FileSystem per (options, credential source); the identity is only a cache key.

    A named ``profile`` is resolved here, in the process that uses it, through boto3's session (the
    credentials never enter ``S3Options``, which Ray pickles)."""
    del credential_identity
    kwargs: dict = {
        "region": opts.region,
        "connect_timeout": opts.connect_timeout,
        "request_timeout": opts.request_timeout,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=opts.max_attempts),
        "anonymous": opts.anonymous,
    }
    if opts.endpoint_url:
        scheme, netloc = _split_endpoint(opts.endpoint_url)
        kwargs.update(scheme=scheme, endpoint_override=netloc)
    if opts.profile and not opts.anonymous:
        creds = _profile_session(opts).get_credentials()
        if creds is None:
            raise StorageError(f"storage.profile={opts.profile!r} has no credentials")
        frozen = creds.get_frozen_credentials()
        kwargs.update(access_key=frozen.access_key, secret_key=frozen.secret_key, session_token=frozen.token)
    return pafs.S3FileSystem(**kwargs)


def _profile_session(opts: S3Options):
    """A boto3 session for ``opts`` (its profile, its region); an unknown profile is a StorageError."""
    import boto3
    import botocore.exceptions as bexc

    try:
        return boto3.session.Session(region_name=opts.region, profile_name=opts.profile)
    except bexc.ProfileNotFound as exc:
        raise StorageError(f"storage.profile={opts.profile!r}: no such profile in the AWS config / credentials "
                           "files (~/.aws/config, ~/.aws/credentials, AWS_CONFIG_FILE)") from exc


def _credential_identity() -> tuple[str | None, ...]:
    """Non-secret values that select which credentials the AWS chain picks up."""
    names = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")
    return tuple(os.environ.get(n) for n in names)


def filesystem(uri: str, s3: S3Options | None = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and in-filesystem path for a URI.

    Args:
        uri: local path or ``s3://bucket/key``.
        s3: S3 options; ``None`` means ``S3Options()`` resolved from the environment.

    Returns:
        (filesystem, path): ``LocalFileSystem`` and the expanded local path, or an
        ``S3FileSystem`` and ``"bucket/key"``.
    """
    _check_scheme(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        opts = (s3 or S3Options()).resolved()
        fs = _cached_s3_filesystem(opts, _credential_identity())
        return fs, f"{bucket}/{key}" if key else bucket
    path = os.path.expanduser(uri)
    if len(path) > 1:
        path = path.rstrip("/") or "/"
    return pafs.LocalFileSystem(), path


def _to_uri(uri: str, fs_path: str) -> str:
    return _S3_PREFIX + fs_path if is_s3(uri) else fs_path


# ----------------------------------------------------------------------------- read / write / list


def read_bytes(uri: str, s3: S3Options | None = None) -> bytes:
    """Read a whole file.

    Args:
        uri: local path or ``s3://bucket/key``.
        s3: S3 options (see :func:`filesystem`).

    Returns:
        The file's bytes.

    Raises:
        FileNotFoundError: the file does not exist.
        OSError: the storage failed (network, permissions).
    """
    fs, path = filesystem(uri, s3)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def new_file_mode() -> int:
    """The mode a new file of this process gets (``0o666`` less the umask): what ``write_bytes`` gives the
    files it renames into place, as ``open()`` would. The umask is read from ``/proc/self/status``
    (thread-safe), else set and restored."""
    try:
        with open("/proc/self/status") as status:
            lines = status.read().splitlines()
        for line in lines:
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def write_bytes(uri: str, data: bytes, s3: S3Options | None = None) -> None:
    """Write a whole file, creating local parent folders.

    Local writes are atomic (temporary file + rename); S3 objects appear only
    when the upload completes.

    Args:
        uri: local path or ``s3://bucket/key`` (the bucket must exist).
        data: the content.
        s3: S3 options (see :func:`filesystem`).
    """
    fs, path = filesystem(uri, s3)
    if is_s3(uri):
        with fs.open_output_stream(path) as stream:
            stream.write(data)
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        os.fchmod(fd, new_file_mode())  # mkstemp's 0600 is for the temporary only
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def list_files(
    uri: str, suffixes: Iterable[str] | None = None, s3: S3Options | None = None
) -> list[str]:
    """All files below a folder or prefix, recursively.

    Args:
        uri: local folder or ``s3://bucket/prefix``.
        suffixes: keep only names ending with one of these (case-insensitive);
            ``None`` keeps every file.
        s3: S3 options (see :func:`filesystem`).

    Returns:
        Full URIs (same form as ``uri``: local paths or ``s3://``), sorted.

    Raises:
        FileNotFoundError: the folder / prefix does not exist.
        OSError: the storage failed (e.g. missing bucket, network).
    """
    fs, path = filesystem(uri, s3)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    paths = [info.path for info in infos if info.type == pafs.FileType.File]
    if suffixes is not None:
        wanted = tuple(suffixes)
        paths = [p for p in paths if _has_suffix(p, wanted)]
    return sorted(_to_uri(uri, p) for p in paths)


def exists(uri: str, s3: S3Options | None = None) -> bool:
    """Whether a file or folder (for S3: a key or a non-empty prefix, or a bucket) exists.

    Args:
        uri: local path or ``s3://`` URI.
        s3: S3 options (see :func:`filesystem`).

    Returns:
        True when something is there; storage failures raise instead of returning False.
    """
    fs, path = filesystem(uri, s3)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


# ----------------------------------------------------------------------------- precheck


def check_source(
    uri: str,
    s3: S3Options | None = None,
    suffixes: Iterable[str] | None = IMAGE_SUFFIXES,
) -> list[str]:
    """Validate a data source before any worker starts and return its files.

    Checks, in order: for S3, that credentials exist (unless anonymous), that
    the endpoint answers (short connect timeout, at most two attempts) and that
    the bucket exists and is readable; for a local path, that it is an existing
    folder; then that it holds at least one file with one of ``suffixes``.

    Args:
        uri: local folder or ``s3://bucket/prefix``.
        s3: S3 options (see :func:`filesystem`).
        suffixes: file suffixes to keep (``None``: any file).

    Returns:
        The matching files as full URIs, sorted.

    Raises:
        StorageError: with the URI and the cause; never with a secret.
    """
    _check_scheme(uri)
    if is_s3(uri):
        _check_s3_access(uri, (s3 or S3Options()).resolved())
    else:
        _check_local_folder(uri)
    wanted = None if suffixes is None else tuple(suffixes)
    try:
        files = list_files(uri, wanted, s3)
    except FileNotFoundError:
        files = []
    except OSError as exc:
        raise StorageError(f"cannot list {uri}: {exc}") from exc
    if not files:
        raise StorageError(_empty_source_message(uri, wanted, s3))
    return files


def _check_local_folder(uri: str) -> None:
    path = os.path.expanduser(uri)
    if not os.path.exists(path):
        raise StorageError(f"local folder {uri!r} does not exist")
    if not os.path.isdir(path):
        raise StorageError(f"{uri!r} is not a folder")


def _empty_source_message(uri: str, suffixes: tuple[str, ...] | None, s3: S3Options | None) -> str:
    where = "prefix" if is_s3(uri) else "folder"
    if suffixes is None:
        return f"{where} {uri!r} is empty: no files found"
    try:
        others = list_files(uri, None, s3)
    except OSError:
        others = []
    if not others:
        return f"{where} {uri!r} is empty: no files found"
    examples = ", ".join(os.path.basename(p) for p in others[:3])
    return (
        f"{where} {uri!r} has {len(others)} file(s) but none ends with one of "
        f"{list(suffixes)} (e.g. {examples})"
    )


def _check_s3_access(uri: str, opts: S3Options) -> None:
    """Fail fast on missing credentials, an unreachable endpoint or a missing bucket."""
    import boto3
    import botocore
    import botocore.config
    import botocore.exceptions as bexc

    bucket, _ = split_s3(uri)
    where = _redact_endpoint(opts.endpoint_url)
    session = _profile_session(opts)
    if not opts.anonymous and session.get_credentials() is None:
        raise StorageError(
            f"no AWS credentials found for {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "a profile (storage.profile or AWS_PROFILE), or an instance role; for a public bucket set "
            "storage.anonymous: true (e.g. --set storage.anonymous=true)"
        )
    config = botocore.config.Config(
        connect_timeout=opts.connect_timeout,
        read_timeout=opts.request_timeout,
        retries={"max_attempts": min(opts.max_attempts, 2), "mode": "standard"},
        signature_version=botocore.UNSIGNED if opts.anonymous else None,
    )
    client = session.client("s3", endpoint_url=opts.endpoint_url, config=config)
    try:
        client.head_bucket(Bucket=bucket)
    except (bexc.ConnectionError, bexc.HTTPClientError) as exc:
        raise StorageError(f"cannot reach the S3 endpoint {where} for {uri} (check storage.endpoint_url): "
                           f"{exc}") from exc
    except bexc.NoCredentialsError as exc:
        raise StorageError(f"no AWS credentials found for {uri}: set storage.profile or AWS_* credentials, "
                           "or storage.anonymous: true for a public bucket") from exc
    except bexc.ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise StorageError(f"bucket {bucket!r} does not exist at {where} (for {uri}; check the URI, "
                               "storage.endpoint_url and storage.region)") from exc
        if code in ("403", "AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise StorageError(
                f"access to bucket {bucket!r} at {where} denied (for {uri}): the credentials "
                f"were rejected or lack permission (error {code}); set storage.profile or the AWS_* "
                "credentials, or storage.anonymous: true for a public bucket"
            ) from exc
        raise StorageError(f"cannot access bucket {bucket!r} at {where} (for {uri}): error {code}; check "
                           "storage.endpoint_url, storage.region and storage.profile") from exc
    finally:
        client.close()


# ----------------------------------------------------------------------------- the handle


@dataclasses.dataclass(frozen=True)
class Storage:
    """The one storage handle: built once from the ``storage`` config, passed down.

    Modules above this one take a ``Storage`` (never raw :class:`S3Options`) and
    call its methods; it is frozen and picklable, so Ray tasks and actors
    receive it as an argument. Local paths ignore the options.

    Example::

        store = Storage.from_config(cfg.storage)
        names = store.list_files("s3://bucket/images", IMAGE_SUFFIXES)
        store.write_bytes("s3://bucket/out/summary.json", b"{}")
    """

    options: S3Options = dataclasses.field(default_factory=S3Options)

    @classmethod
    def from_config(cls, section) -> Storage:
        """Build from a ``StorageConfig`` (``endpoint_url``, ``region``, ``anonymous``, ``profile``);
        ``None`` means the environment's defaults."""
        if section is None:
            return cls()
        return cls(S3Options(endpoint_url=section.endpoint_url, region=section.region,
                             anonymous=section.anonymous, profile=section.profile))

    def filesystem(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """See :func:`filesystem`."""
        return filesystem(uri, self.options)

    def read_bytes(self, uri: str) -> bytes:
        """See :func:`read_bytes`."""
        return read_bytes(uri, self.options)

    def write_bytes(self, uri: str, data: bytes) -> None:
        """See :func:`write_bytes`."""
        write_bytes(uri, data, self.options)

    def list_files(self, uri: str, suffixes: Iterable[str] | None = None) -> list[str]:
        """See :func:`list_files`."""
        return list_files(uri, suffixes, self.options)

    def exists(self, uri: str) -> bool:
        """See :func:`exists`."""
        return exists(uri, self.options)

    def check_source(self, uri: str, suffixes: Iterable[str] | None = IMAGE_SUFFIXES) -> list[str]:
        """See :func:`check_source`."""
        return check_source(uri, self.options, suffixes)

    join = staticmethod(join)
    is_s3 = staticmethod(is_s3)
