"""Serving security: API keys (bearer tokens), a per-client rate limit, the non-loopback guard.

Keys are kept only as SHA-256 digests: a check hashes the presented token and compares it
with every stored digest using ``hmac.compare_digest`` and no early exit, so neither the
position of a match nor a key's length shows in the response time. Keys are never logged,
never passed to worker processes (they re-read the file) and never written to audit records.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import time
from pathlib import Path

from canestra.errors import InputError

LOOPBACK_NAMES = ("localhost", "ip6-localhost")
_MAX_CLIENTS = 10_000  # rate-limit buckets kept per worker before idle ones are dropped


def load_api_keys(path: str) -> list[bytes]:
    """SHA-256 digests of the keys in ``path``: one per line, blank lines and ``#`` comments ignored."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"API keys file {path} does not exist: pass a file with one key per line") from None
    except IsADirectoryError:
        raise InputError(f"API keys file {path} is a folder: pass a file with one key per line") from None
    except PermissionError:
        raise InputError(f"API keys file {path} cannot be read (permission denied)") from None
    except UnicodeDecodeError:
        raise InputError(f"API keys file {path} is not UTF-8 text: one key per line") from None
    except OSError as exc:
        raise InputError(f"API keys file {path} cannot be read ({exc.strerror or type(exc).__name__})") from None
    keys = [line.strip() for line in text.splitlines()]
    keys = [k for k in keys if k and not k.startswith("#")]
    if not keys:
        raise InputError(f"API keys file {path} holds no key: put one key per line (# starts a comment)")
    if any(any(c.isspace() for c in k) for k in keys):
        raise InputError(f"API keys file {path}: a key contains a space; put one key per line")
    return [hashlib.sha256(k.encode("utf-8")).digest() for k in keys]


def key_matches(token: str, digests: list[bytes]) -> bool:
    """Whether ``token`` is one of the keys; compares against every key, whatever matched first."""
    candidate = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
    found = False
    for digest in digests:
        found |= hmac.compare_digest(candidate, digest)
    return found


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


class RateLimiter:
    """Token buckets per client address: ``rate`` requests/s on average, bursts up to ``burst``.

    One per worker process (no shared state between workers). Used from the event loop only.
    """

    def __init__(self, rate: float, burst: int, clock=time.monotonic):
        self.rate = rate
        self.burst = max(1, burst)
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, last refill time)

    def retry_after(self, client: str) -> int:
        """0 when ``client`` may proceed (and charge it one request), else whole seconds to wait."""
        now = self.clock()
        tokens, last = self._buckets.get(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[client] = (tokens - 1.0, now)
            if len(self._buckets) > _MAX_CLIENTS:
                self._forget_idle(now)
            return 0
        self._buckets[client] = (tokens, now)
        return max(1, math.ceil((1.0 - tokens) / self.rate))

    def _forget_idle(self, now: float) -> None:
        # A bucket that has refilled completely is the same as no bucket: drop it to bound memory.
        full = [c for c, (t, last) in self._buckets.items() if t + (now - last) * self.rate >= self.burst]
        for c in full:
            del self._buckets[c]
        if len(self._buckets) > _MAX_CLIENTS:  # still too many busy clients: forget the oldest half
            for c, _ in sorted(self._buckets.items(), key=lambda kv: kv[1][1])[: len(self._buckets) // 2]:
                del self._buckets[c]
