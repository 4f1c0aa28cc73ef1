"""Running the service: bind, warm the model up, announce the address, serve until SIGTERM or Ctrl-C.

The socket is bound before uvicorn starts, so port 0 (any free port) works and the printed address is the
real one. On SIGTERM uvicorn stops accepting, lets the requests in flight finish (up to `drain` seconds),
and the batch worker finishes what is queued.
"""
from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable

import numpy as np

from ..errors import UserError
from ..workflows.predictor import Predictor
from ..workflows.retrain import RetrainSettings
from ..workflows.review import ReviewSession
from .app import create_app
from .review_app import create_review_app
from .uploads import Limits


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def warm_up(predictor: Predictor, warn: Callable[[str], None]) -> None:
    """One blank photo through every network and the head, and the catalogue loaded: the first real request
    then pays no set-up. Without a catalogue the service still tags photos; /similar says why it cannot."""
    blank = tuple(np.zeros((p.image_size, p.image_size, 3), np.uint8) for p in predictor.pipeline.decoders)
    predictor.predict_decoded([blank], ["warm-up"])
    try:
        predictor.catalogue.index
    except UserError as exc:
        warn(f"no similar products: {exc}")


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def listen(host: str, port: int) -> tuple[socket.socket, str]:
    """A bound, listening socket and its address as a URL (the real port when `port` is 0): connections made
    as soon as the URL is announced wait in its backlog rather than being refused."""
    sock = bind(host, port)
    sock.listen(2048)
    address = sock.getsockname()
    shown = f"[{address[0]}]" if ":" in address[0] else address[0]
    return sock, f"http://{shown}:{address[1]}"


def serve(predictor: Predictor, host: str = "127.0.0.1", port: int = 8080, limits: Limits = Limits(),
          drain: int = 30, announce: Callable[[str], None] = print, warn: Callable[[str], None] = print,
          access_log: bool = False) -> None:
    """Serve `predictor` over HTTP on host:port until stopped; `announce` receives the address once ready,
    `warn` what the service cannot do (no catalogue for /similar)."""
    import uvicorn

    warm_up(predictor, warn)
    sock, url = listen(host, port)
    config = uvicorn.Config(create_app(predictor, limits), log_level="warning", access_log=access_log,
                            timeout_graceful_shutdown=drain, limit_concurrency=limits.max_queue + 64)
    announce(url)
    uvicorn.Server(config).run(sockets=[sock])


def serve_review(session: ReviewSession, token: str, host: str = "127.0.0.1", port: int = 8765,
                 announce: Callable[[str], None] = print, retrain: RetrainSettings = RetrainSettings()) -> None:
    """Serve the review page of `session` on host:port until stopped; `announce` receives its URL, token
    included, once ready."""
    import uvicorn

    sock, url = listen(host, port)
    config = uvicorn.Config(create_review_app(session, token, retrain), log_level="warning",
                            access_log=False, timeout_graceful_shutdown=5)
    announce(f"{url}/?token={token}")
    uvicorn.Server(config).run(sockets=[sock])
