"""`bulklabel review serve QUEUE`: the review app on uvicorn, on a loopback address unless told otherwise, behind a
token printed once in the URL (as Jupyter does)."""

from __future__ import annotations

import ipaddress
import logging
import secrets
import socket
from collections.abc import Callable
from pathlib import Path

from pydantic import Field

from jobs.errors import BadInput
from jobs.output.corrections import open_queue
from jobs.review.app import build_app
from jobs.review.assign import LEASE_S
from jobs.review.images import Pictures
from jobs.review.state import ReviewState
from schemas.specs import Spec, StorageOptions

log = logging.getLogger(__name__)

DEFAULT_PORT = 8470


class ServeOptions(Spec):
    """How `review serve` runs."""

    queue: str = Field(description="The queue's output (of `review-queue` or `label-issues`).")
    host: str = Field(default="127.0.0.1", description="Address to bind; any other than loopback is reachable by "
                                                      "others, who still need the token.")  # fmt: skip
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535, description="0: any free port.")
    classes: tuple[str, ...] = Field(default=(), description="Labels reviewers may pick besides the queue's own.")
    lease_s: float = Field(default=LEASE_S, gt=0, description="How long an image shown to a reviewer stays theirs.")
    storage: StorageOptions = StorageOptions()


def read_classes(value: str | None) -> tuple[str, ...]:
    """`--classes`: a file of one class per line, or a comma-separated list."""
    if not value:
        return ()
    path = Path(value)
    text = path.read_text() if path.is_file() else value.replace(",", "\n")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(options: ServeOptions, announce: Callable[[str], None], token: str | None = None) -> None:
    """Serve until interrupted; `announce(url)` once the socket listens (the URL holds the token)."""
    import uvicorn

    queue = open_queue(options.queue, options.storage)
    state = ReviewState(queue, options.classes, options.lease_s)
    if not state.items:
        raise BadInput(f"queue {queue.uri} has no images to review")
    token = token or secrets.token_urlsafe(24)
    app = build_app(state, Pictures(queue, options.storage), token, loopback=is_loopback(options.host))
    family = socket.AF_INET6 if ":" in options.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it: without, a response written in two pieces (headers, body) waited for the
    # client's delayed ACK, 40 ms on every request (measured: p50 44 ms for a 2 ms decision).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((options.host, options.port))
    except OSError as exc:
        raise BadInput(f"cannot listen on {options.host}:{options.port}: {exc.strerror}") from None
    sock.listen(2048)  # before the URL is out: a client that connects at once waits in the backlog, never refused
    port = sock.getsockname()[1]
    shown = f"[{options.host}]" if family == socket.AF_INET6 else options.host
    # access_log off: its request lines would carry the token of the first request.
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    announce(f"http://{shown}:{port}/?token={token}")
    log.info("reviewing %s: %d image(s), %d left", queue.uri, len(state.items), state.assignments.open_count)
    server.run(sockets=[sock])
