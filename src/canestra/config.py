"""All settings in one typed place. Precedence: CLI flags > ``CANESTRA_*`` env vars > defaults.

The fields are grouped by concern (``CONCERNS``: Spark, featurizer, labelled data, model, serving,
storage, privacy, output), each with a ``TypedDict`` of its keyword types (``OPTIONS``): the API
functions take only the concerns they use (``canestra.api.TAKES``). ``Settings`` itself stays flat
(``cfg.pca_k``), so the modules that read it need not know the grouping; ``cfg.concern("model")``
is one concern's values.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypedDict

from canestra.errors import InputError

__all__ = ["CONCERNS", "FLAGS", "OPTIONS", "DataOptions", "FeaturizerOptions", "ModelOptions", "OutputOptions",
           "PrivacyOptions", "ServingOptions", "Settings", "SparkOptions", "StorageOptions", "cli_home",
           "cli_names", "parse_sizes", "unknown_setting"]


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


# ---------------------------------------------------------------------------- concerns
# One TypedDict per concern: the keywords an API call may pass for it, with the types it accepts
# (looser than the fields': ``image_sizes=100``). Same names and order as the fields of Settings.


class SparkOptions(TypedDict, total=False):
    """Spark: where the jobs run and the driver's resources (every Spark call)."""

    master: str
    driver_memory: str
    arrow_batch: int


class FeaturizerOptions(TypedDict, total=False):
    """The CNN featurizer (train; a saved model carries its own)."""

    image_sizes: int | str | Sequence[int]
    batch_size: int
    threads: int
    precision: str


class DataOptions(TypedDict, total=False):
    """Labelled images: the held-out split and the class -> family table (ingest, train)."""

    test_fraction: float
    seed: int
    taxonomy: str | None


class ModelOptions(TypedDict, total=False):
    """PCA, logistic regression, augmentation and the "unknown" rule (train)."""

    pca_k: int | None
    pca_variance: float | None
    reg_param: float
    elastic_net: float
    max_iter: int
    augment_views: int
    unknown_quantile: float
    shift_eval: bool
    answer_head: bool


class ServingOptions(TypedDict, total=False):
    """``canestra serve``: bind, workers, limits, access (docs/serving.md)."""

    host: str
    port: int
    workers: int
    serve_threads: int | None
    max_upload_mb: float
    max_batch: int
    api_keys_file: str | None
    allow_no_auth: bool
    rate_limit: float
    rate_burst: int
    body_timeout: float
    drain_timeout: float
    max_decoded_mb: float
    worker_decoded_mb: float
    header_timeout: float
    forwarded_allow_ips: str | None
    allowed_hosts: str | None
    log_format: str
    feedback_dir: str | None
    model_poll: float


class StorageOptions(TypedDict, total=False):
    """S3 for images and outputs (docs/storage.md; every call that reads or writes them)."""

    s3_endpoint_url: str | None
    allow_http_endpoint: bool
    allow_non_eu_region: bool
    sse_kms_key_id: str | None
    s3_max_attempts: int


class PrivacyOptions(TypedDict, total=False):
    """GDPR documents and retention (``canestra purge``, ``canestra gdpr record``)."""

    retention_days: float | None
    controller: str | None


class OutputOptions(TypedDict, total=False):
    """What a run shows and logs besides its outputs (every call)."""

    debug: bool
    audit_log: str | None


OPTIONS: dict[str, type] = {"spark": SparkOptions, "featurizer": FeaturizerOptions, "data": DataOptions,
                            "model": ModelOptions, "serving": ServingOptions, "storage": StorageOptions,
                            "privacy": PrivacyOptions, "output": OutputOptions}
# concern -> its Settings fields, in declaration order (tests/test_settings.py: every field exactly once)
CONCERNS: dict[str, tuple[str, ...]] = {name: tuple(td.__annotations__) for name, td in OPTIONS.items()}


@dataclass
class Settings:
    # -- spark
    master: str = "local[*]"
    driver_memory: str = "4g"
    arrow_batch: int = 256  # rows per Arrow batch into the UDF: bounds worker memory

    # -- featurizer
    # 224 px, one pass (1,280-d), PCA 512, L2 1e-5: on the cross-source bench (bench/cross_source.py,
    # docs/outside-the-studio.md section 7) as good as 160 + 224 on real photos from other sources for
    # 1.6x less featurizing. precision "auto": int8 on CPUs with VNNI (2.2x the fp32 rate at 224 px, same
    # cross-source accuracy), fp32 elsewhere (int8 is 3-6x slower than fp32 without VNNI).
    image_sizes: tuple[int, ...] = (224,)
    batch_size: int = 64  # images per ONNX Runtime call
    threads: int = 1  # ONNX Runtime threads per Spark task
    precision: str = "auto"  # auto | fp32 | int8 (docs/performance.md); a model stores the one it used

    # -- data: the held-out split, and the class -> family table (default: the shipped Fruits-360
    # one; docs/outside-the-studio.md)
    test_fraction: float = 0.2
    seed: int = 42
    taxonomy: str | None = None

    # -- model
    pca_k: int | None = 512
    pca_variance: float | None = None
    reg_param: float = 1e-5
    elastic_net: float = 0.0
    max_iter: int = 50
    # Augmented views (crop, mirror, light, blur) of each family-labelled training photo: +7-15 points
    # of family top-1 on photos of other sources (docs/outside-the-studio.md section 7); 0 = off.
    augment_views: int = 4
    # Outside the studio: share of held-out images the "unknown" rule may refuse, and the shift evaluation.
    unknown_quantile: float = 0.005
    shift_eval: bool = True
    # A model trained on studio varieties only mixes into its answer a second classifier on the CNN's last block
    # (the "unknown" rule stays on the main one): +2.4 points of top-1 on capture sessions left out of training,
    # +0.24 on the 5-block split, -5.3 of family answers on real photos it never trained on
    # (docs/outside-the-studio.md 7, eighth turn). False: one head.
    answer_head: bool = True

    # -- serving (canestra serve): bind address, worker processes, ONNX Runtime threads per worker
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
    # Log lines on stderr: "text" (uvicorn's, no line per request) or "json" (one object per line,
    # one per request too: request id, route, status, duration; docs/serving.md).
    log_format: str = "text"
    # Learning from the field (docs/feedback.md): where POST /v1/feedback stores corrections sent with consent
    # (a local folder or s3:// prefix; erase, purge and gdpr record cover it too), and how often a service
    # whose --model is a pointer or an MLflow alias checks it for a promoted model (0 = on SIGHUP only).
    feedback_dir: str | None = None
    model_poll: float = 10.0

    # -- storage: S3 (docs/storage.md): endpoint (else AWS_ENDPOINT_URL_S3 / the AWS default), plain-http
    # opt-in for local emulators, GDPR Art. 44 region opt-out, SSE-KMS key (default SSE-S3).
    s3_endpoint_url: str | None = None
    allow_http_endpoint: bool = False
    allow_non_eu_region: bool = False
    sse_kms_key_id: str | None = None
    s3_max_attempts: int = 4  # tries per S3 request, the first included (throttling/5xx retried, standard mode)

    # -- privacy (GDPR): retention (purge default, record of processing), controller name.
    retention_days: float | None = None
    controller: str | None = None

    # -- output: full tracebacks and JVM lines on the terminal, an extra audit log (JSON Lines).
    debug: bool = False
    audit_log: str | None = None

    _ENV_PREFIX = "CANESTRA_"

    @classmethod
    def load(cls, **overrides: Any) -> Settings:
        """Defaults, then env vars, then non-None overrides (the CLI flags, or API keywords)."""
        s = cls()
        for f in fields(cls):
            env = os.environ.get(cls._ENV_PREFIX + f.name.upper())
            if env is not None:
                s._set(f.name, env)
        for key, value in overrides.items():
            if key not in _FIELDS:  # before the None test: a misspelled keyword is never silently dropped
                raise InputError(unknown_setting(key, _FIELDS))
            if value is not None:
                s._set(key, value)
        # Each message names the field's flag and its variable: the bad value may have come from either.
        if s.pca_variance is not None:
            if not 0.0 < s.pca_variance <= 1.0:
                raise InputError(f"{cli_names('pca_variance')} must be in (0, 1], got {s.pca_variance}")
            s.pca_k = None
        if not 0.0 < s.test_fraction < 1.0:
            raise InputError(f"{cli_names('test_fraction')} must be between 0 and 1 (exclusive), "
                             f"got {s.test_fraction}")
        if not 0 <= s.augment_views <= 32:
            raise InputError(f"{cli_names('augment_views')} must be between 0 and 32, got {s.augment_views}")
        for name in ("batch_size", "threads", "arrow_batch"):
            if getattr(s, name) < 1:
                raise InputError(f"{cli_names(name)} must be a positive number, got {getattr(s, name)}")
        if s.precision not in ("auto", "fp32", "int8"):
            raise InputError(f"{cli_names('precision')} must be auto, fp32 or int8, got {s.precision!r}")
        if not 0.0 <= s.unknown_quantile < 0.5:
            raise InputError(f"{cli_names('unknown_quantile')} must be in [0, 0.5), got {s.unknown_quantile}")
        if s.s3_max_attempts < 1:
            raise InputError(f"{cli_names('s3_max_attempts')} must be at least 1, got {s.s3_max_attempts}")
        if s.pca_k is not None and s.pca_k < 1:
            raise InputError(f"{cli_names('pca_k')} must be a positive number of components, got {s.pca_k}")
        if s.retention_days is not None and s.retention_days < 0:
            raise InputError(f"retention must be a number of days >= 0 ({cli_names('retention_days')}), "
                             f"got {s.retention_days}")
        return s

    def _set(self, name: str, value: Any) -> None:
        if name not in _FIELDS:  # not hasattr: methods and class constants are no settings
            raise InputError(unknown_setting(name, _FIELDS))
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
            kind_name = ("int" if name in ("pca_k", "serve_threads") else "float"
                         if name in ("pca_variance", "retention_days") else type(default).__name__)
            raise InputError(f"setting {name}={value!r} is not a valid {kind_name} ({cli_names(name)})") from None
        setattr(self, name, value)

    def concern(self, name: str) -> dict[str, Any]:
        """One concern's values (``cfg.concern("serving")``), in declaration order."""
        if name not in CONCERNS:
            raise InputError(f"unknown concern {name!r}: one of {', '.join(CONCERNS)}")
        return {key: getattr(self, key) for key in CONCERNS[name]}

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_sizes"] = list(self.image_sizes)
        return d


_FIELDS = tuple(f.name for f in fields(Settings))

# ---------------------------------------------------------------------------- names in messages
# Each field's command-line flag and the command that shows it in --help (tests/test_settings.py
# checks this table against the parser, hidden aliases excluded); fields missing here have no
# flag and are set by their CANESTRA_<FIELD> variable.
FLAGS: dict[str, tuple[str, str]] = {
    "master": ("train", "--master"), "arrow_batch": ("train", "--arrow-batch"),
    "image_sizes": ("train", "--image-size"), "batch_size": ("train", "--batch-size"),
    "threads": ("train", "--task-threads"), "precision": ("train", "--precision"),
    "test_fraction": ("train", "--test-fraction"), "seed": ("train", "--seed"), "taxonomy": ("train", "--taxonomy"),
    "pca_k": ("train", "--pca-k"), "pca_variance": ("train", "--pca-variance"), "reg_param": ("train", "--reg-param"),
    "max_iter": ("train", "--max-iter"), "augment_views": ("train", "--augment-views"),
    "unknown_quantile": ("train", "--unknown-quantile"), "shift_eval": ("train", "--no-shift-eval"),
    "answer_head": ("train", "--no-answer-head"),
    **{name: ("serve", "--" + name.replace("_", "-")) for name in ServingOptions.__annotations__},
    "serve_threads": ("serve", "--worker-threads"),
    **{name: ("train", "--" + name.replace("_", "-")) for name in StorageOptions.__annotations__
       if name != "s3_max_attempts"},
    "retention_days": ("purge", "--older-than"),
    "debug": ("train", "--debug"), "audit_log": ("train", "--audit-log"),
}
# The command a concern's settings belong to, for a keyword sent to the wrong call; privacy's two
# fields belong to different commands.
_HOME = {"spark": "train", "featurizer": "train", "data": "train", "model": "train", "serving": "serve",
         "storage": "train", "output": "train", "retention_days": "purge", "controller": "gdpr record"}


def _concern_of(name: str) -> str:
    return next(c for c, keys in CONCERNS.items() if name in keys)


def cli_names(name: str) -> str:
    """How the command line sets field ``name``: ``--pca-k / CANESTRA_PCA_K``, or only its variable."""
    env = Settings._ENV_PREFIX + name.upper()
    return f"{FLAGS[name][1]} / {env}" if name in FLAGS else env


def cli_home(name: str) -> str:
    """The command line that sets field ``name``: "`canestra serve --port` (or CANESTRA_PORT)", or
    "`canestra gdpr record` with CANESTRA_CONTROLLER" for a field without a flag."""
    env = Settings._ENV_PREFIX + name.upper()
    if name in FLAGS:
        command, flag = FLAGS[name]
        return f"`canestra {command} {flag}` (or {env})"
    return f"`canestra {_HOME.get(name) or _HOME[_concern_of(name)]}` with {env}"


def unknown_setting(name: str, choices: Iterable[str]) -> str:
    """"unknown setting pca_kk (did you mean pca_k?)": the closest of ``choices``, when one is close."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f"unknown setting {name}" + (f" (did you mean {close[0]}?)" if close else "")
