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


M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MMAP_THRESHOLD = 1 << 20


def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    except (OSError, AttributeError):  # not glibc
        return None
    return libc


_LIBC = _libc()


def return_memory() -> None:
    """Give freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def keep_big_buffers_mapped() -> None:
    """Make glibc serve every allocation of 1 MiB or more (bodies, tensors) from its own mapping, which
    goes back to the OS when freed. By default glibc raises that threshold to the largest buffer freed
    so far (up to 32 MiB), after which such buffers land in the heaps of the worker threads, which
    malloc_trim cannot shrink: measured, 30 MB stayed resident after each 46 MB request."""
    if _LIBC is not None:
        _LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
