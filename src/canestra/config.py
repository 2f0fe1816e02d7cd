"""All settings in one typed place. Precedence: CLI flags > ``CANESTRA_*`` env vars > defaults."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from typing import Any

from canestra.errors import InputError


def parse_sizes(value: str | int | list | tuple) -> tuple[int, ...]:
    """``"100"`` / ``"224"`` / ``"100,224"`` (concatenated embeddings)."""
    if isinstance(value, int):
        return (value,)
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    try:
        sizes = tuple(int(v) for v in str(value).replace("+", ",").split(",") if v.strip())
    except ValueError:
        raise InputError(f"image size {value!r} is not a number: use e.g. 100, 224 or 100,224") from None
    if not sizes or any(s < 32 or s > 1024 for s in sizes):
        raise InputError(f"image size {value!r} must be between 32 and 1024 pixels, e.g. 100 or 224")
    return sizes


@dataclass
class Settings:
    master: str = "local[*]"
    # 224 px, one pass (1,280-d), PCA 512, L2 1e-5: on the cross-source bench (bench/cross_source.py,
    # docs/outside-the-studio.md section 7) as good as 160 + 224 on real photos from other sources for
    # 1.6x less featurizing; int8 is no default: 3-6x slower than fp32 on CPUs without VNNI.
    image_sizes: tuple[int, ...] = (224,)
    # Augmented views (crop, mirror, light, blur) of each family-labelled training photo: +7-15 points
    # of family top-1 on photos of other sources (docs/outside-the-studio.md section 7); 0 = off.
    augment_views: int = 4
    batch_size: int = 64  # images per ONNX Runtime call
    arrow_batch: int = 256  # rows per Arrow batch into the UDF: bounds worker memory
    threads: int = 1  # ONNX Runtime threads per Spark task
    precision: str = "fp32"  # or "int8": ~2x faster with VNNI, 3-4x slower without (docs/performance.md)
    pca_k: int | None = 512
    pca_variance: float | None = None
    test_fraction: float = 0.2
    seed: int = 42
    reg_param: float = 1e-5
    elastic_net: float = 0.0
    max_iter: int = 50
    driver_memory: str = "4g"
    # Outside the studio (docs/outside-the-studio.md): class -> family table (default: the shipped
    # Fruits-360 one), share of held-out images the "unknown" rule may refuse, and the shift evaluation.
    taxonomy: str | None = None
    unknown_quantile: float = 0.005
    shift_eval: bool = True
    debug: bool = False
    # GDPR: retention (purge default, record of processing), controller name, extra audit log.
    retention_days: float | None = None
    controller: str | None = None
    audit_log: str | None = None
    # canestra serve: bind address, worker processes, ONNX Runtime threads per worker
    # (None = cores // workers), upload limit per image and images per batch request.
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    serve_threads: int | None = None
    max_upload_mb: float = 10.0
    max_batch: int = 16
    # Serving security (docs/serving.md): bearer keys file, opt-out of the non-loopback key
    # requirement, per-client rate limit (requests/s and burst, per worker; 0 = off), seconds a
    # request body may take to arrive (slow clients), seconds SIGTERM waits for in-flight requests.
    api_keys_file: str | None = None
    allow_no_auth: bool = False
    rate_limit: float = 20.0
    rate_burst: int = 40
    body_timeout: float = 30.0
    drain_timeout: float = 30.0
    # Decode bombs and slow clients (docs/serving.md): decoded bytes (width x height x channels after
    # mode expansion) of one image, and of all the requests one worker has taken on at once (0 = 4 x
    # an image's), seconds the request headers may take to arrive.
    max_decoded_mb: float = 128.0
    worker_decoded_mb: float = 0.0
    header_timeout: float = 10.0
    # Proxies and DNS rebinding: proxy addresses/networks whose X-Forwarded-For is believed (none by
    # default), extra Host names a loopback bind answers (besides IP addresses and localhost).
    forwarded_allow_ips: str | None = None
    allowed_hosts: str | None = None
    # S3 (docs/storage.md): endpoint (else AWS_ENDPOINT_URL_S3 / the AWS default), plain-http
    # opt-in for local emulators, GDPR Art. 44 region opt-out, SSE-KMS key (default SSE-S3).
    s3_endpoint_url: str | None = None
    allow_http_endpoint: bool = False
    allow_non_eu_region: bool = False
    sse_kms_key_id: str | None = None
    s3_max_attempts: int = 4  # tries per S3 request, the first included (throttling/5xx retried, standard mode)

    _ENV_PREFIX = "CANESTRA_"

    @classmethod
    def load(cls, **overrides: Any) -> Settings:
        """Defaults, then env vars, then non-None overrides (the CLI flags)."""
        s = cls()
        for f in fields(cls):
            env = os.environ.get(cls._ENV_PREFIX + f.name.upper())
            if env is not None:
                s._set(f.name, env)
        for key, value in overrides.items():
            if value is not None:
                s._set(key, value)
        if s.pca_variance is not None:
            if not 0.0 < s.pca_variance <= 1.0:
                raise InputError(f"--pca-variance must be in (0, 1], got {s.pca_variance}")
            s.pca_k = None
        if not 0.0 < s.test_fraction < 1.0:
            raise InputError(f"--test-fraction must be between 0 and 1 (exclusive), got {s.test_fraction}")
        if not 0 <= s.augment_views <= 32:
            raise InputError(f"--augment-views must be between 0 and 32, got {s.augment_views}")
        if s.batch_size < 1 or s.threads < 1 or s.arrow_batch < 1:
            raise InputError("--batch-size, --threads and --arrow-batch must be positive numbers")
        if s.precision not in ("fp32", "int8"):
            raise InputError(f"--precision must be fp32 or int8, got {s.precision!r}")
        if not 0.0 <= s.unknown_quantile < 0.5:
            raise InputError(f"--unknown-quantile must be in [0, 0.5), got {s.unknown_quantile}")
        if s.s3_max_attempts < 1:
            raise InputError(f"CANESTRA_S3_MAX_ATTEMPTS must be at least 1, got {s.s3_max_attempts}")
        if s.pca_k is not None and s.pca_k < 1:
            raise InputError(f"--pca-k must be a positive number of components, got {s.pca_k}")
        if s.retention_days is not None and s.retention_days < 0:
            raise InputError(f"retention must be a number of days >= 0 (--older-than / CANESTRA_RETENTION_DAYS), got {s.retention_days}")
        return s

    def _set(self, name: str, value: Any) -> None:
        if not hasattr(self, name):
            raise InputError(f"unknown setting {name}")
        default = self.__dataclass_fields__[name].default
        try:
            if name == "image_sizes":
                value = parse_sizes(value)
            elif isinstance(value, str):
                kind = type(default) if default is not None and default is not dataclasses.MISSING else None
                if name in ("pca_k", "serve_threads"):
                    value = None if value.lower() in ("", "none", "0") else int(value)
                elif name in ("pca_variance", "retention_days"):
                    value = None if value.lower() in ("", "none") else float(value)
                elif kind is bool:
                    value = value.lower() in ("1", "true", "yes", "on")
                elif kind is int:
                    value = int(value)
                elif kind is float:
                    value = float(value)
        except ValueError:
            raise InputError(f"setting {name}={value!r} is not a valid {type(default).__name__}") from None
        setattr(self, name, value)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_sizes"] = list(self.image_sizes)
        return d
