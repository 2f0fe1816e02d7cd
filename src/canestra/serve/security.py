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
import os
import stat
import threading
import time
from pathlib import Path

from canestra.errors import InputError

LOOPBACK_NAMES = ("localhost", "ip6-localhost")
_MAX_CLIENTS = 10_000  # rate-limit buckets kept per worker before idle ones are dropped
MIN_KEY_LENGTH = 16  # characters: `openssl rand -hex 24` gives 48; shorter keys can be guessed


def load_api_keys(path: str) -> list[bytes]:
    """SHA-256 digests of the keys in ``path``: one per line, blank lines and ``#`` comments ignored."""
    try:
        # utf-8-sig: a BOM (Windows editors) would otherwise become part of the first key
        text = Path(path).read_text(encoding="utf-8-sig")
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
    short = sum(1 for k in keys if len(k) < MIN_KEY_LENGTH)
    if short:
        raise InputError(f"API keys file {path}: {short} key(s) shorter than {MIN_KEY_LENGTH} characters; "
                         "make keys long and random, e.g. `openssl rand -hex 24`")
    return [hashlib.sha256(k.encode("utf-8")).digest() for k in keys]


def keys_file_warning(path: str) -> str | None:
    """A warning when others than the owner may read the keys file (mode & 0o077), else None."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None  # load_api_keys says what is wrong with it
    if os.name != "posix" or not mode & 0o077:
        return None
    return (f"API keys file {path} can be read by other users (mode {stat.filemode(mode)}): "
            f"run `chmod 600 {path}`")


class KeyRing:
    """The accepted keys (as digests), re-read from the keys file by :meth:`reload` (SIGHUP).

    A reload that fails (file gone, emptied, a short key) keeps the keys in force: a typo while
    editing the file must neither open the service nor lock every client out.
    """

    def __init__(self, path: str):
        self.path = path
        self._digests = load_api_keys(path)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._digests)

    def matches(self, token: str) -> bool:
        return key_matches(token, self._digests)

    def reload(self) -> tuple[int, str | None]:
        """(keys now in force, None) or (keys still in force, why the file was not taken)."""
        with self._lock:
            try:
                digests = load_api_keys(self.path)
            except InputError as exc:
                return len(self._digests), str(exc)
            self._digests = digests  # one reference swap: requests see the old or the new list
            return len(digests), None


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
    At most ``_MAX_CLIENTS`` buckets: only a bucket that has refilled completely (the same as no
    bucket) is ever dropped, so a throttled client never gets a fresh one. While every bucket is
    still in use, clients without one share a single overflow bucket: a flood of new addresses
    then throttles itself instead of pushing known clients out.
    """

    _OVERFLOW = "\0overflow"  # not an address: never collides with a client

    def __init__(self, rate: float, burst: int, clock=time.monotonic):
        self.rate = rate
        self.burst = max(1, burst)
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, last refill time)
        self._overflow = (float(self.burst), clock())
        self._next_sweep = float("-inf")

    def retry_after(self, client: str) -> int:
        """0 when ``client`` may proceed (and charge it one request), else whole seconds to wait."""
        now = self.clock()
        if client not in self._buckets and len(self._buckets) >= _MAX_CLIENTS:
            self._forget_full(now)
            if len(self._buckets) >= _MAX_CLIENTS:
                client = self._OVERFLOW
        state = self._overflow if client == self._OVERFLOW else self._buckets.get(client, (float(self.burst), now))
        tokens = min(float(self.burst), state[0] + (now - state[1]) * self.rate)
        wait = 0 if tokens >= 1.0 else max(1, math.ceil((1.0 - tokens) / self.rate))
        state = (tokens - 1.0 if not wait else tokens, now)
        if client == self._OVERFLOW:
            self._overflow = state
        else:
            self._buckets[client] = state
        return wait

    def _forget_full(self, now: float) -> None:
        # One pass over the table at most every burst/rate seconds (the time an idle bucket takes
        # to refill): a flood of new addresses must not turn every request into a full scan.
        if now < self._next_sweep:
            return
        self._next_sweep = now + min(self.burst / self.rate, 60.0)
        full = [c for c, (t, last) in self._buckets.items() if t + (now - last) * self.rate >= self.burst]
        for c in full:
            del self._buckets[c]
