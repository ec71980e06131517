"""Connection-level guards on top of uvicorn's h11 protocol: deadlines that a slow or stalled client
cannot outlast, a bound on what is read and dropped after an early answer, JSON for malformed HTTP, and
an access log whose paths are cut to a readable length.

uvicorn alone has a keep-alive timeout between requests but no deadline for a request's headers or
body: a client that sends one byte a minute holds its connection for ever.
"""

from __future__ import annotations

import json
import logging

import h11
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

log = logging.getLogger("cvconvert.serve")

BODY_GRACE_S = 1.0  # the app answers a late body with 408 at the deadline; the connection closes this later
MAX_LOGGED_PATH = 200  # characters of path and query string in a log line


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with two deadlines, both closing the connection when they pass:
    the request headers must arrive within `header_timeout` seconds of the connection opening (or of the
    first byte of a later request on it), the whole body within `body_timeout` (+ a grace second, as
    the app answers 408 itself at `body_timeout`). After the app has answered without reading the whole
    body (413, 404 ...), at most `discard_limit` more bytes of it are read and dropped."""

    header_timeout = 10.0
    body_timeout = 30.0
    discard_limit = 64 << 20

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._timer = None
        self._phase = None  # "head", "body" or None: what the running deadline is for
        self._dropped = 0

    @classmethod
    def with_limits(cls, header_timeout: float, body_timeout: float, discard_limit: int) -> type:
        return type(cls.__name__, (cls,), {"header_timeout": header_timeout, "body_timeout": body_timeout,
                                           "discard_limit": discard_limit})

    def connection_made(self, transport):
        super().connection_made(transport)
        self._set_phase("head")

    def connection_lost(self, exc):
        self._set_phase(None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.cycle is not None and self.cycle.response_complete and self.conn.their_state is h11.SEND_BODY:
            self._dropped += len(data)  # uvicorn drops the rest of an answered request's body
            if self._dropped > self.discard_limit:
                self.transport.close()
                return
        super().data_received(data)
        self._retime()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._retime()

    def _retime(self) -> None:
        """Pick the deadline for what the connection waits for now (after every event)."""
        their = self.conn.their_state
        if their is h11.SEND_BODY:
            phase = "body"
        elif their is h11.IDLE and (self._phase == "head" or self.conn.trailing_data[0]):
            phase = "head"  # part of the next request's head has arrived
        else:  # nothing expected (a request is being answered) or idle between requests (keep-alive)
            phase = None
        if phase != self._phase:
            self._set_phase(phase)

    def _set_phase(self, phase) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._phase = phase
        if phase == "head":
            self._dropped = 0
            self._timer = self.loop.call_later(self.header_timeout, self._expire, phase)
        elif phase == "body":
            self._timer = self.loop.call_later(self.body_timeout + BODY_GRACE_S, self._expire, phase)

    def _expire(self, phase: str) -> None:
        self._timer = None
        if not self.transport.is_closing():
            log.debug("closing a connection: its request %s did not arrive in time", phase)
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to malformed HTTP, as JSON like every other error."""
        body = json.dumps({"error": f"invalid HTTP request: {msg}"[:200]}).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=STATUS_PHRASES[400]),
                      h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


class ShortPaths(logging.Filter):
    """Cuts the path in uvicorn's access-log lines ('%s - "%s %s HTTP/%s" %d') to MAX_LOGGED_PATH."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and len(args[2]) > MAX_LOGGED_PATH:
            record.args = (*args[:2], f"{args[2][:MAX_LOGGED_PATH]}...({len(args[2])} chars)", *args[3:])
        return True


def short_path(path: str) -> str:
    return path if len(path) <= MAX_LOGGED_PATH else f"{path[:MAX_LOGGED_PATH]}...({len(path)} chars)"


def install_log_filter() -> None:
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, ShortPaths) for f in access.filters):
        access.addFilter(ShortPaths())
