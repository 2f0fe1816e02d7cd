"""S3 behind canestra's storage seam: boto3 clients, GDPR guards, plain errors.

- GDPR Art. 44: a bucket's region is asked from S3 (HeadBucket's ``x-amz-bucket-region``,
  else GetBucketLocation), never assumed; outside the EU/EEA it is refused unless
  ``--allow-non-eu-region``.
- GDPR Art. 32: every object canestra writes (or copies) carries server-side encryption,
  SSE-S3 (``AES256``) or SSE-KMS with ``--sse-kms-key-id``; plain ``http://`` endpoints
  are refused unless ``--allow-http-endpoint``, and then only on a loopback host (local emulators).
- Credentials come from the standard AWS chain (env, profile, instance role). They are
  never printed: ``S3Options`` hides them from ``repr`` and error messages never quote them.

Only the standard library is imported at module level: boto3 (the ``s3`` extra) loads on
first use, so local-only installs stay lean. Plain boto3 rather than s3fs: s3fs needs
aiobotocore, which pins botocore to a narrow range and would fight the boto3 that
``canestra deploy aws`` uses.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from canestra.errors import CanestraError, EnvironmentProblem, InputError

__all__ = ["S3Options", "check_bucket", "check_endpoint", "client", "delete", "exists", "is_s3", "join",
           "list_objects", "probe_writable", "put_if_absent", "read_bytes", "replace_tree", "split_uri", "write_bytes"]

SCHEMES = ("s3://", "s3a://")
_ACCESS_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "ExpiredToken",
                 "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem", "InvalidSecurity"}
# Error codes S3 answers when it sheds load or fails inside (retried by botocore first).
_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                   "ServiceUnavailable", "InternalError", "RequestTimeout"}
_ENV_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def is_s3(uri: str) -> bool:
    return str(uri).lower().startswith(SCHEMES)


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` -> ``("bucket", "a/b")``."""
    rest = str(uri).split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise InputError(f"{uri} names no bucket: use s3://BUCKET/PREFIX")
    return bucket, key.strip("/")


def join(uri: str, *parts: str) -> str:
    return "/".join([str(uri).rstrip("/"), *(p.strip("/") for p in parts)])


def check_endpoint(endpoint_url: str | None, allow_http: bool, flag: str = "--s3-endpoint-url") -> None:
    """GDPR Art. 32: image bytes and signed requests only over TLS; the one rule for every AWS endpoint.

    Plain ``http://`` only when asked for (``--allow-http-endpoint``) and only to a loopback
    host: a local emulator, never data crossing a network unencrypted.
    """
    if not endpoint_url:
        return
    url = urlparse(endpoint_url)
    if url.scheme == "https" and url.hostname:
        return
    if url.scheme != "http" or not url.hostname:
        raise InputError(f"{flag} {endpoint_url!r} is not an https:// URL: use e.g. https://s3.eu-west-3.amazonaws.com")
    if not allow_http:
        raise InputError(
            f"{flag} {endpoint_url} is plain http:// (unencrypted): use https://, or pass "
            "--allow-http-endpoint (env CANESTRA_ALLOW_HTTP_ENDPOINT=1) for a local emulator on 127.0.0.1"
        )
    try:
        loopback = ipaddress.ip_address(url.hostname).is_loopback
    except ValueError:
        loopback = url.hostname == "localhost"
    if not loopback:
        raise InputError(f"--allow-http-endpoint only allows a loopback host (127.0.0.1), not {url.hostname!r}")


@dataclass(frozen=True)
class S3Options:
    """How to reach S3. Picklable and hashable: it travels to the executors in the task closure."""

    endpoint_url: str | None = None
    allow_http_endpoint: bool = False
    allow_non_eu_region: bool = False
    sse_kms_key_id: str | None = None
    # (key id, secret, session token) found in the driver's environment, so executors started
    # before they were set can use them too (as Spark does for s3a). Never shown by repr.
    credentials: tuple[str, str, str | None] | None = field(default=None, repr=False)
    max_attempts: int = 4  # per request, the first included (botocore total_max_attempts)

    @classmethod
    def from_settings(cls, cfg: Any) -> S3Options:
        endpoint = (getattr(cfg, "s3_endpoint_url", None) or os.environ.get("AWS_ENDPOINT_URL_S3")
                    or os.environ.get("AWS_ENDPOINT_URL") or None)
        key, secret, token = (os.environ.get(n) or None for n in _ENV_CREDENTIALS)
        return cls(
            endpoint_url=endpoint,
            allow_http_endpoint=bool(getattr(cfg, "allow_http_endpoint", False)),
            allow_non_eu_region=bool(getattr(cfg, "allow_non_eu_region", False)),
            sse_kms_key_id=getattr(cfg, "sse_kms_key_id", None) or None,
            credentials=(key, secret, token) if key and secret else None,
            max_attempts=int(getattr(cfg, "s3_max_attempts", None) or cls.max_attempts),
        )

    def check_endpoint(self) -> None:
        check_endpoint(self.endpoint_url, self.allow_http_endpoint)

    def sse_kwargs(self) -> dict[str, str]:
        """Request parameters that make S3 encrypt what canestra writes (PutObject, CopyObject, uploads)."""
        if self.sse_kms_key_id:
            return {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": self.sse_kms_key_id}
        return {"ServerSideEncryption": "AES256"}

    def where(self) -> str:
        return self.endpoint_url or "AWS S3"


# One client per options per process: on executors, one per Python worker, shared by its tasks
# (boto3 clients are thread-safe; creating them is not, hence the lock).
_CLIENTS: dict[S3Options, Any] = {}
_CLIENTS_LOCK = threading.Lock()
_CHECKED_BUCKETS: dict[tuple[S3Options, str], str] = {}
_DELETE_BATCH = 1000  # DeleteObjects limit


def client(opts: S3Options):
    c = _CLIENTS.get(opts)
    if c is not None:
        return c
    opts.check_endpoint()
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise EnvironmentProblem("s3:// paths need boto3: pip install 'canestra[s3]'") from None
    key, secret, token = opts.credentials or (None, None, None)
    with _CLIENTS_LOCK:
        c = _CLIENTS.get(opts)
        if c is None:
            # A private session: None credentials fall through to the standard chain (profile, role).
            session = boto3.session.Session(aws_access_key_id=key, aws_secret_access_key=secret,
                                            aws_session_token=token)
            # Standard mode retries throttling (503 SlowDown) and 5xx with jittered exponential
            # backoff; attempts come from Settings (CANESTRA_S3_MAX_ATTEMPTS), few by default so a
            # dead endpoint's error stays quick.
            c = session.client("s3", endpoint_url=opts.endpoint_url, config=Config(
                retries={"total_max_attempts": opts.max_attempts, "mode": "standard"},
                connect_timeout=10, read_timeout=60, max_pool_connections=16))
            _CLIENTS[opts] = c
    return c


# --------------------------------------------------------------------------- errors


def _error_code(exc: BaseException) -> str | None:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = (response.get("Error") or {}).get("Code")
            if code:
                return str(code)
        e = e.__cause__ or e.__context__
    return None


def _is_unreachable(exc: BaseException) -> bool:
    names: set[str] = set()
    e: BaseException | None = exc
    while e is not None and len(names) < 10:
        names.update(c.__name__ for c in type(e).__mro__)
        e = e.__cause__ or e.__context__
    return bool(names & {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError",
                         "ServerDisconnectedError", "ConnectionRefusedError"})


def plain_error(exc: BaseException, uri: str, opts: S3Options, error_cls: type[CanestraError] = InputError
                ) -> CanestraError | None:
    """A one-line, credential-free reading of an S3 failure, or None when it is not a known one."""
    code = _error_code(exc)
    if code in _ACCESS_CODES or (code is None and isinstance(exc, PermissionError)):
        return error_cls(f"S3 access denied for {uri}: check credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                         "AWS_PROFILE or the instance role) and the bucket policy")
    if code == "NoSuchBucket":
        return error_cls(f"S3 bucket {split_uri(uri)[0]} does not exist ({uri}): check the bucket name")
    if type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        return error_cls(f"no AWS credentials found for {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                         "AWS_PROFILE, or run with an instance role")
    if code in _THROTTLE_CODES or (code or "").isdigit() and (code or "").startswith("5"):
        return error_cls(f"S3 at {opts.where()} kept failing for {uri} ({code}, {opts.max_attempts} attempts): "
                         "the service is throttling or unavailable; retry later, or allow more attempts with "
                         "CANESTRA_S3_MAX_ATTEMPTS")
    if _is_unreachable(exc):
        return error_cls(f"cannot reach the S3 endpoint {opts.where()} for {uri}: check --s3-endpoint-url "
                         "(env CANESTRA_S3_ENDPOINT_URL) and the network")
    return None


@contextlib.contextmanager
def plain_errors(uri: str, opts: S3Options, error_cls: type[CanestraError] = InputError) -> Iterator[None]:
    """Turn known S3 failures inside the block into one-line canestra errors."""
    try:
        yield
    except CanestraError:
        raise
    except Exception as exc:
        plain = plain_error(exc, uri, opts, error_cls)
        if plain is None:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            plain = error_cls(f"S3 request for {uri} failed ({type(exc).__name__}: {first})")
        raise plain from None  # the chained botocore error would repeat request details


# --------------------------------------------------------------------------- region (GDPR Art. 44)


def bucket_region(opts: S3Options, bucket: str) -> str:
    """The region S3 reports for ``bucket``: GetBucketLocation, else HeadBucket's ``x-amz-bucket-region``.

    Least-privilege roles often allow s3:GetBucketLocation but s3:ListBucket only on some
    prefixes (then HeadBucket is refused); callers of another account's bucket get the
    opposite. S3 sends the region header even on a refused HeadBucket.
    """
    c = client(opts)
    try:
        location = c.get_bucket_location(Bucket=bucket).get("LocationConstraint")
        # GetBucketLocation answers None for us-east-1 and "EU" for the legacy eu-west-1 name.
        return str({None: "us-east-1", "": "us-east-1", "EU": "eu-west-1"}.get(location, location))
    except Exception as first:
        try:
            response = c.head_bucket(Bucket=bucket)
        except Exception as exc:
            response = _response_of(exc) or {}
        region = response.get("BucketRegion") or (response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
                                                   .get("x-amz-bucket-region"))
        if not region:
            raise first
        return str(region)


def _response_of(exc: BaseException) -> dict | None:
    e: BaseException | None = exc
    for _ in range(5):
        if e is None:
            return None
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            return response
        e = e.__cause__ or e.__context__
    return None


def check_bucket(uri: str, opts: S3Options, error_cls: type[CanestraError] = InputError) -> str:
    """Reachable, readable and in an allowed region; returns the bucket's region."""
    from canestra.storage.regions import check_region

    bucket, _ = split_uri(uri)
    cached = _CHECKED_BUCKETS.get((opts, bucket))
    if cached:
        return cached
    with plain_errors(uri, opts, error_cls):
        try:
            region = bucket_region(opts, bucket)
        except Exception as exc:
            if _error_code(exc) in ("404", "NoSuchBucket") or isinstance(exc, FileNotFoundError):
                raise error_cls(f"S3 bucket {bucket} does not exist ({uri}): check the bucket name") from None
            raise
    check_region(region, opts.allow_non_eu_region, f"S3 bucket {bucket} ({uri})")
    _CHECKED_BUCKETS[(opts, bucket)] = region
    return region


# --------------------------------------------------------------------------- objects


def _keys(c, bucket: str, prefix: str) -> Iterator[dict]:
    """Every object under ``prefix``: paginated ListObjectsV2 (1,000 keys a request), no delimiter."""
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        yield from page.get("Contents", [])


def _missing(exc: BaseException) -> bool:
    return _error_code(exc) in ("404", "NoSuchKey", "NotFound")


def list_objects(uri: str, opts: S3Options) -> list[tuple[str, str, int, float]]:
    """Every object under ``uri`` as ``(uri, path relative to uri, size, mtime)``.

    The listing returns keys with sizes and modification times: no request per object.
    A ``uri`` naming one object (no objects under it as a prefix) costs one HeadObject.
    """
    check_bucket(uri, opts)
    bucket, prefix = split_uri(uri)
    scheme = str(uri).split("://", 1)[0]
    c = client(opts)
    found: list[tuple[str, str, int, Any]] = []
    with plain_errors(uri, opts):
        for obj in _keys(c, bucket, f"{prefix}/" if prefix else ""):
            key = obj["Key"]
            if not key.endswith("/"):  # "folder" placeholder objects
                found.append((key, key[len(prefix) + 1:] if prefix else key, obj.get("Size", 0),
                              obj.get("LastModified")))
        if not found and prefix:
            try:
                head = c.head_object(Bucket=bucket, Key=prefix)
                found.append((prefix, prefix.rsplit("/", 1)[-1], head.get("ContentLength", 0),
                              head.get("LastModified")))
            except Exception as exc:
                if not _missing(exc):
                    raise
    return [(f"{scheme}://{bucket}/{key}", rel, int(size or 0),
             modified.timestamp() if hasattr(modified, "timestamp") else 0.0)
            for key, rel, size, modified in found]


def read_bytes(uri: str, opts: S3Options) -> bytes:
    """An object's bytes; OSError with a plain message on failure (the caller quarantines the file)."""
    bucket, key = split_uri(uri)
    try:
        return client(opts).get_object(Bucket=bucket, Key=key)["Body"].read()
    except CanestraError as exc:
        raise OSError(str(exc)) from None
    except Exception as exc:
        if _missing(exc):
            raise FileNotFoundError(f"no such S3 object {uri}") from None
        plain = plain_error(exc, uri, opts)
        raise OSError(str(plain) if plain else f"S3 read of {uri} failed ({type(exc).__name__})") from None


def write_bytes(uri: str, data: bytes, opts: S3Options) -> None:
    """One PutObject (atomic on S3), encrypted at rest (GDPR Art. 32)."""
    from canestra.errors import OutputError

    check_bucket(uri, opts, OutputError)  # once per bucket and process
    bucket, key = split_uri(uri)
    with plain_errors(uri, opts, OutputError):
        client(opts).put_object(Bucket=bucket, Key=key, Body=data, **opts.sse_kwargs())


def put_if_absent(uri: str, data: bytes, opts: S3Options) -> bool:
    """Create an object only if none exists (conditional put, ``If-None-Match: *``).

    False when the object already exists (412), or another writer's put raced ours (409).
    """
    from canestra.errors import OutputError

    check_bucket(uri, opts, OutputError)
    bucket, key = split_uri(uri)
    with plain_errors(uri, opts, OutputError):
        try:
            client(opts).put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*", **opts.sse_kwargs())
        except Exception as exc:
            if _error_code(exc) in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise
    return True


def exists(uri: str, opts: S3Options) -> bool:
    """An object, or a prefix with at least one object under it."""
    bucket, key = split_uri(uri)
    c = client(opts)
    with plain_errors(uri, opts):
        if key:
            try:
                c.head_object(Bucket=bucket, Key=key)
                return True
            except Exception as exc:
                if not _missing(exc):
                    raise
        listed = c.list_objects_v2(Bucket=bucket, Prefix=f"{key}/" if key else "", MaxKeys=1)
        return bool(listed.get("KeyCount") or listed.get("Contents"))


def delete(uri: str, opts: S3Options) -> bool:
    """Delete one object (erase --delete-source); False when it did not exist."""
    from canestra.errors import OutputError

    bucket, key = split_uri(uri)
    c = client(opts)
    with plain_errors(uri, opts, OutputError):
        try:
            c.head_object(Bucket=bucket, Key=key)  # only an object: a prefix (folder source) stays
        except Exception as exc:
            if _missing(exc):
                return False
            raise
        c.delete_object(Bucket=bucket, Key=key)
    return True


def _delete_prefix(c, bucket: str, prefix: str) -> None:
    keys = [o["Key"] for o in _keys(c, bucket, prefix)]
    for i in range(0, len(keys), _DELETE_BATCH):  # one request per 1,000 keys, not one per key
        c.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + _DELETE_BATCH]],
                                                "Quiet": True})


def probe_writable(uri: str, opts: S3Options) -> None:
    """Prove ``uri`` accepts (encrypted) writes, leaving nothing behind."""
    from canestra.errors import OutputError

    probe = join(uri, f".canestra-write-test-{uuid.uuid4().hex[:12]}")
    write_bytes(probe, b"", opts)
    bucket, key = split_uri(probe)
    with plain_errors(probe, opts, OutputError):
        client(opts).delete_object(Bucket=bucket, Key=key)


def replace_tree(staging: str, final: str, opts: S3Options) -> None:
    """Publish ``staging`` as ``final``: copy every object (re-encrypted), then delete the staging copy.

    S3 has no rename: between deleting the old table and the last copy a reader can see
    a partial table. A crash leaves the complete staging copy under ``_staging/``.
    """
    from canestra.errors import OutputError

    c = client(opts)
    src_bucket, src_key = split_uri(staging)
    dst_bucket, dst_key = split_uri(final)
    with plain_errors(final, opts, OutputError):
        _delete_prefix(c, dst_bucket, f"{dst_key}/")
        for obj in _keys(c, src_bucket, f"{src_key}/"):
            rel = obj["Key"][len(src_key) + 1:]
            # Managed copy (multipart above 8 MB); ExtraArgs re-encrypts: Spark's own writes may not be.
            c.copy({"Bucket": src_bucket, "Key": obj["Key"]}, dst_bucket, f"{dst_key}/{rel}",
                   ExtraArgs=opts.sse_kwargs())
        _delete_prefix(c, src_bucket, f"{src_key}/")
