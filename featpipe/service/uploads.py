"""Request bodies: a size limit enforced while the body arrives, and uploads turned into decoded photos or a
one-line reason why not."""
from __future__ import annotations

from dataclasses import dataclass

from ..workflows.predictor import Predictor


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 20 * 1024 * 1024  # a phone photo is a few MB; several in one request fit
    max_pixels: int = 50_000_000  # before resizing: a photo's own size, not what its file claims to compress to
    max_files: int = 64  # photos in one request
    max_batch: int = 16  # photos in one forward pass, gathered from concurrent requests
    batch_window: float = 0.005  # seconds the batch worker waits for more photos after the first
    max_queue: int = 256  # photos waiting; more is answered 503
    timeout: float = 30.0  # seconds a request may wait for its answer; then 504


class UploadError(ValueError):
    """An upload that is not a photo this service can read: answered 422 with this one line."""


def decode_upload(predictor: Predictor, name: str, data: bytes, limits: Limits) -> tuple:
    """The decoded photo, or UploadError naming the file and why it cannot be read."""
    if not data:
        raise UploadError(f"{name}: empty upload; send the photo's bytes")
    try:
        return predictor.decode(data, limits.max_pixels)
    except Exception as exc:  # PIL raises many types for what is not a readable image
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UploadError(f"{name}: not a readable image ({text[:200]}); send a JPEG, PNG or WebP photo") from None


DRAIN_FACTOR = 4  # a body up to this many times the limit is read (and dropped) before the 413


class BodyLimit:
    """ASGI middleware: refuse a body over `max_bytes` with 413, counted as it arrives (a chunked body declares
    no length). The body is read whole before the app sees it: a parser stopped halfway would answer 500. One
    over the limit is still read to its end, up to DRAIN_FACTOR times the limit, so the client hears the 413
    rather than a reset connection; one that declares more is refused before it is read."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        declared = int(length) if length is not None and length.isdigit() else None
        if declared is not None and declared > DRAIN_FACTOR * self.max_bytes:
            return await _too_large(send, self.max_bytes)  # too much to read even to throw away: close on it
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            seen += len(message.get("body", b""))
            if seen <= self.max_bytes:
                chunks.append(message.get("body", b""))
            elif seen > DRAIN_FACTOR * self.max_bytes:
                break
            if not message.get("more_body"):
                break
        if seen > self.max_bytes:
            # read to the end when it is not much more, so the client hears 413 rather than a reset connection
            return await _too_large(send, self.max_bytes)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


async def _too_large(send, max_bytes: int) -> None:
    body = (b'{"detail":"request body over the limit of %d bytes; send smaller photos or fewer at a time"}'
            % max_bytes)
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
