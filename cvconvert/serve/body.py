"""Request bodies under limits: a size limit (checked from Content-Length before anything is read, then
while reading and while decompressing), a deadline for the whole body, and a byte budget shared by all
requests, so that the memory the server holds for bodies stays bounded however many clients send."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import threading
import zlib

from .errors import RequestError

DECODE_CHUNK = 1 << 20  # bytes of decompressed output per step


class ByteBudget:
    """Bytes of request bodies (as received, and decompressed) held at once, over all requests.
    Thread-safe: decompression takes from it in the worker pool."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.limit:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n


class Reservation:
    """One request's share of the budget; `release` gives it all back."""

    def __init__(self, budget: ByteBudget):
        self.budget, self.held = budget, 0

    def take(self, n: int) -> None:
        if not self.budget.take(n):
            mib = self.budget.limit / 2 ** 20
            raise RequestError(f"server busy: {mib:g} MiB of request bodies in flight, retry later", 503)
        self.held += n

    def release(self) -> int:
        held, self.held = self.held, 0
        self.budget.give(held)
        return held


def over_limit(declared: str | None, limit: int) -> RequestError | None:
    """The 413 for a Content-Length over the limit, decided from the header alone (so a client that
    waits for `100 Continue` gets the answer instead and sends nothing)."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return RequestError(f"request body of {declared} bytes is over the server's limit of {limit} bytes", 413)
    return None


async def read_body(request, limit: int, timeout: float, reservation: Reservation) -> bytearray:
    """The raw body, at most `limit` bytes, all of it within `timeout` seconds (else 408, and the
    connection is closed). Memory grows with what arrives, not with what Content-Length promises."""
    error = over_limit(request.headers.get("content-length"), limit)
    if error is not None:
        raise error
    try:
        return await asyncio.wait_for(_collect(request, limit, reservation), timeout)
    except asyncio.TimeoutError:
        raise RequestError(f"the request body did not arrive within {timeout:g} s", 408, close=True) from None


async def _collect(request, limit: int, reservation: Reservation) -> bytearray:
    body = bytearray()
    async for chunk in request.stream():
        if len(body) + len(chunk) > limit:  # stop here: no more of it is kept
            raise RequestError(f"request body is over the server's limit of {limit} bytes", 413)
        reservation.take(len(chunk))
        body += chunk
    return body


def decode_body(body: bytearray, encoding: str, limit: int, reservation: Reservation) -> bytearray:
    """The body after Content-Encoding (gzip or deflate, as tritonclient can send), at most `limit`
    bytes: a small compressed body must not expand past it. Runs in the worker pool."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise RequestError(f"unsupported Content-Encoding {encoding[:40]!r} (use gzip, deflate or none)")
    d = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    out, view = bytearray(), memoryview(body)
    try:
        for i in range(0, len(body), DECODE_CHUNK):
            data = view[i:i + DECODE_CHUNK]
            while data and not d.eof:  # bytes after the end of the stream are ignored
                piece = d.decompress(data, DECODE_CHUNK)
                data = d.unconsumed_tail
                if len(out) + len(piece) > limit:
                    raise RequestError(f"decompressed request body is over the server's limit of {limit} bytes",
                                       413)
                reservation.take(len(piece))
                out += piece
    except zlib.error:
        raise RequestError(f"the body is not valid {encoding} data") from None
    if not d.eof:
        raise RequestError(f"the {encoding} body is truncated")
    return out


def _malloc_trim():
    """glibc's malloc_trim, or None elsewhere. Freed request buffers stay in glibc's arenas (one per
    worker thread) until trimmed, so without it the resident size never comes back after a burst."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_TRIM = _malloc_trim()


def return_memory() -> None:
    """Give freed heap memory back to the OS (a no-op off glibc)."""
    if _TRIM is not None:
        _TRIM(0)
