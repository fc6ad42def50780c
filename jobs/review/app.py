"""The review app over HTTP: Starlette on uvicorn (jobs.review.server).

Starlette rather than FastAPI: six routes whose bodies are validated by the project's own frozen pydantic models
(jobs.review.state), no OpenAPI to serve, and one package less between a request and the store. Endpoints are plain
functions, so Starlette runs them in its thread pool: committing a decision (a write and an fsync, or an S3 PUT)
never blocks the event loop.

Secure by default:
- every request needs the token: `?token=` once (it becomes an HttpOnly, SameSite=Strict cookie and the page
  redirects to a URL without it), or `Authorization: Bearer` for scripts;
- every write with the cookie needs the CSRF token of the page (`X-CSRF-Token`, an HMAC of the token) and, where
  the browser sends one, an Origin of this server;
- a Content-Security-Policy with no inline script and nothing from elsewhere; the page builds its DOM with
  `textContent` only; the token is never logged (uvicorn's access log, which would print it, is off);
- `/image/N` serves the queue's N-th item only: no path, key or bucket comes from the request;
- on a loopback address, only loopback Host headers (no DNS rebinding).
"""

from __future__ import annotations

import hashlib
import hmac
import html
import logging
from importlib import resources
from urllib.parse import urlsplit

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobs.errors import BadInput
from jobs.review.images import Pictures
from jobs.review.state import Conflict, DecisionRequest, NextRequest, NotFound, ReviewState

log = logging.getLogger(__name__)

COOKIE = "bulklabel_review"
CSRF_HEADER = "x-csrf-token"
MAX_BODY = 16 << 10  # bytes: a decision is a few hundred
STATIC = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")  # fmt: skip
HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
           (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY"),
           (b"cross-origin-opener-policy", b"same-origin"), (b"cache-control", b"no-store")]  # fmt: skip
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


class Denied(Exception):
    """No (or a wrong) token, or a write without its CSRF token: 403."""


class _SecurityHeaders:
    """Every response, errors included, with the headers above."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []), *(h for h in HEADERS if h[0] not in names)]
            await send(message)

        await self.app(scope, receive, with_headers)


def csrf_of(token: str) -> str:
    return hmac.new(token.encode(), b"bulklabel-review-csrf", hashlib.sha256).hexdigest()


def build_app(state: ReviewState, pictures: Pictures, token: str, loopback: bool) -> Starlette:
    """The app over `state`; `token` guards it; `loopback`: served on a loopback address (Host headers checked)."""
    csrf = csrf_of(token)

    def authorised(request: Request, write: bool = False) -> None:
        bearer = request.headers.get("authorization", "")
        if bearer.startswith("Bearer ") and hmac.compare_digest(bearer[7:].encode(), token.encode()):
            return  # a script's own credential: not sent by a browser on its own, so no CSRF to fear
        if not hmac.compare_digest(request.cookies.get(COOKIE, "").encode(), token.encode()):
            raise Denied("open the review URL with its token (printed by `bulklabel review serve`)")
        if write:
            if not hmac.compare_digest(request.headers.get(CSRF_HEADER, "").encode(), csrf.encode()):
                raise Denied("a write needs the page's CSRF token")
            origin = request.headers.get("origin")
            if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
                raise Denied(f"a write from another origin ({origin}) is refused")

    async def body_of(request: Request, model):
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise BadInput(f"request body above {MAX_BODY} bytes")
        try:
            return model.model_validate_json(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            raise BadInput(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}") from None

    def page(request: Request) -> Response:
        given = request.query_params.get("token")
        if given is not None:
            if not hmac.compare_digest(given.encode(), token.encode()):
                raise Denied("wrong token")
            response = RedirectResponse("/", status_code=303)  # the token leaves the address bar and the history
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https")
            return response
        authorised(request)
        body = PAGE.format(queue=html.escape(state.queue.uri), csrf=html.escape(csrf),
                           table=html.escape(state.queue.manifest.table))  # fmt: skip
        return HTMLResponse(body)

    def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            raise NotFound(f"no static file {name!r}")
        data = resources.files("jobs.review").joinpath("static", name).read_bytes()
        return Response(data, media_type=STATIC[name])

    def config(request: Request) -> Response:
        authorised(request)
        reviewer = request.query_params.get("reviewer")
        return JSONResponse({"classes": state.classes, "progress": state.progress(reviewer),
                             "queue": state.queue.uri, "table": state.queue.manifest.table})  # fmt: skip

    async def next_item(request: Request) -> Response:
        authorised(request, write=True)
        ask = await body_of(request, NextRequest)
        item = await _in_thread(state.next_item, ask)
        return JSONResponse({"item": item, "progress": state.progress(ask.reviewer)})

    async def decide(request: Request) -> Response:
        authorised(request, write=True)
        ask = await body_of(request, DecisionRequest)
        return JSONResponse(await _in_thread(state.decide, ask))

    async def image(request: Request) -> Response:
        authorised(request)
        item = state.item(request.path_params["index"])
        jpeg, problem = await _in_thread(pictures.jpeg, item)
        if jpeg is None:
            return JSONResponse({"error": problem}, status_code=404)
        return Response(jpeg, media_type="image/jpeg", headers={"cache-control": "private, max-age=3600"})

    def failed(status: int):
        async def handler(request: Request, exc: Exception) -> Response:
            return JSONResponse({"error": str(exc)}, status_code=status)

        return handler

    middleware = [Middleware(_SecurityHeaders)]
    if loopback:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost", "::1"]))
    return Starlette(
        routes=[Route("/", page), Route("/static/{name}", static), Route("/api/config", config),
                Route("/api/next", next_item, methods=["POST"]), Route("/api/decisions", decide, methods=["POST"]),
                Route("/image/{index:int}", image), Route("/favicon.ico", lambda request: Response(status_code=204))],
        middleware=middleware,
        exception_handlers={Denied: failed(403), NotFound: failed(404), Conflict: failed(409), BadInput: failed(400)},
    )  # fmt: skip


async def _in_thread(function, *args):
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(function, *args)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>bulklabel review</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="csrf-token" content="{csrf}"><meta name="queue" content="{queue}">
<link rel="stylesheet" href="/static/app.css"></head>
<body>
<header><strong>bulklabel review</strong> <span class="dim">{table} · {queue}</span>
<span id="progress" class="right"></span></header>
<main>
<section id="who" hidden><label>Your name <input id="reviewer" maxlength="64" autocomplete="name"></label>
<button id="start">Start</button></section>
<section id="review" hidden>
<div class="filters"><label>predicted <select id="f-predicted"></select></label>
<label>given <select id="f-given"></select></label></div>
<div class="stage"><img id="picture" alt=""><p id="problem" class="problem" hidden></p></div>
<aside>
<p id="reason" class="dim"></p>
<p>given: <b id="given"></b></p>
<p id="decided" class="decided" hidden></p>
<ol id="choices"></ol>
<div id="search" hidden><input id="search-input" placeholder="class name" autocomplete="off">
<ul id="matches"></ul></div>
<p class="keys dim">1–9 pick · / search · x bad · s skip · u undo · ← → move</p>
<div class="bad"><button data-bad="not-a-subject">not a subject</button><button data-bad="blurred">blurred</button>
<button data-bad="duplicate">duplicate</button></div>
</aside>
</section>
<section id="done" hidden><p>Nothing left to review with these filters.</p></section>
<p id="status" class="dim" role="status"></p>
</main>
<script src="/static/app.js"></script>
</body></html>
"""
