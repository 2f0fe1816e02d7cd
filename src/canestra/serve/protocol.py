"""uvicorn's HTTP/1.1 protocols with a deadline on the request headers (slow-header clients).

uvicorn times out idle keep-alive connections, and ``--body-timeout`` bounds the body, but a
client that sends its request line and headers a byte at a time (slowloris) holds a connection
for as long as it likes. Here each request's headers must be complete within
``header_timeout`` seconds of the connection opening or of the request's first byte; when they
are not, the client gets ``408`` and the connection is closed.

The classes are named by import path in uvicorn's config, which workers receive pickled, so they
read the timeout in the worker, from the settings the CLI passes in ``CANESTRA_SERVE_CONFIG``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
from typing import Any

_BODY = b'{"detail": "request headers not received in time: the client was too slow or stalled"}'
_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(_BODY)).encode() + b"\r\nconnection: close\r\n\r\n" + _BODY)


@functools.cache
def header_timeout() -> float:
    from canestra.serve.app import ENV_CONFIG

    try:
        return float(json.loads(os.environ.get(ENV_CONFIG) or "{}").get("header_timeout") or 10.0)
    except (ValueError, TypeError, AttributeError):
        return 10.0


class _HeaderDeadline:
    """The timer, shared by both protocol classes (mixed in before uvicorn's class)."""

    transport: asyncio.Transport
    cycle: Any
    _header_timer: asyncio.TimerHandle | None = None

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = asyncio.get_running_loop().call_later(header_timeout(), self._headers_too_slow)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:  # no response of ours is being written
            self.transport.write(_408)
        self.transport.close()


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - httptools is part of the serve extra
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

try:
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError:  # pragma: no cover
    H11Protocol = None  # type: ignore[assignment,misc]


if HttpToolsProtocol is not None:
    class HeaderTimeoutHttpTools(_HeaderDeadline, HttpToolsProtocol):  # type: ignore[misc,valid-type]
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()  # a client that connects and sends nothing

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm_header_timer()  # the first byte of each request on a kept-alive connection

        def on_headers_complete(self) -> None:
            self._disarm_header_timer()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_timer()
            super().connection_lost(exc)


if H11Protocol is not None:
    class HeaderTimeoutH11(_HeaderDeadline, H11Protocol):  # type: ignore[misc,valid-type]
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.IDLE:
                self._arm_header_timer()
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # h11 has parsed the whole request head
                self._disarm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_timer()
            super().connection_lost(exc)


def protocol_class() -> type | None:
    """The protocol uvicorn's ``http="auto"`` would pick, with the header deadline; None: neither."""
    if HttpToolsProtocol is not None:
        return HeaderTimeoutHttpTools
    if H11Protocol is not None:
        return HeaderTimeoutH11
    return None  # pragma: no cover
