"""The explorer's gate, in front of every route: the request body's size, the ``Host``
and, for the API, the site a browser says the request comes from.

* A body past the limit is refused with 413 whether its size is declared
  (``Content-Length``) or not (``Transfer-Encoding: chunked``): the chunks are counted as
  they arrive, so a client cannot make the server hold more than the limit.
* ``hosts`` names what the ``Host`` header may carry. ``attnlab serve`` on a loopback
  address answers only ``127.0.0.1``, ``localhost``, ``::1`` and its own address: a web
  page whose name was made to resolve to 127.0.0.1 (DNS rebinding) sends its own name and
  gets 403, so it can neither queue work nor read the answers. ``None`` lets any host in
  (``--allow-remote``; and an app built by :func:`~attnlab.serve.create_app` for use
  inside other code). The names are read by :func:`attnlab._hosts.host_name`, which
  ``attnlab serve --allow-host`` checks with, before this module is imported.
* An API request that a browser marks as sent by another site (``Sec-Fetch-Site:
  cross-site`` or ``same-site``: a page elsewhere, or on another port of this machine)
  gets 403 before anything runs. Such a page could not read the answer, but its
  ``<img src=".../api/models/NAME">`` made the server load a checkpoint. The page's own
  requests are ``same-origin``; one typed or opened by the user is ``none``; clients
  other than browsers send no such header and are let in.
* :class:`HeadAsGet` answers ``HEAD`` as ``GET`` without the body.
* :class:`Headers` puts :data:`SECURITY_HEADERS` on every answer, the gate's own refusals
  included: no MIME sniffing (a JSON answer read as HTML), no referrer, and a content
  policy that fits the page (its own scripts, styles and API; pictures from ``data:`` and
  ``blob:`` URLs, the upload's preview; nothing from elsewhere, no framing).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Collection, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException

from attnlab._hosts import LOOPBACK_HOSTS, host_name

__all__ = ["LOOPBACK_HOSTS", "SECURITY_HEADERS", "Guard", "HeadAsGet", "Headers", "host_name"]

SECURITY_HEADERS: dict[str, str] = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "content-security-policy": (
        "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
}

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class _TooLarge(HTTPException):
    """A streamed body went past the limit: an HTTP error, so that FastAPI, which reads
    the body, answers it as one (413) instead of "There was an error parsing the body"."""


class Guard:
    """ASGI middleware: 413 past ``max_body`` bytes, 403 for a ``Host`` not in ``hosts``."""

    def __init__(self, app: Any, max_body: int, hosts: Collection[str] | None = None) -> None:
        self.app, self.max_body = app, max_body
        self.hosts = None if hosts is None else {host_name(h) for h in hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        refused = self._refused(headers, scope.get("path", ""))
        if refused is not None:
            return await _answer(send, *refused)
        seen, started = 0, False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise _TooLarge(413, self._too_large(f"over {self.max_body}"))
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge as e:
            if started:
                raise
            await _answer(send, 413, str(e.detail))

    def _refused(self, headers: dict[str, str], path: str) -> tuple[int, str] | None:
        """(status, detail) of a request refused on its headers and path alone, or None."""
        host, site = headers.get("host", ""), headers.get("sec-fetch-site", "")
        if path.startswith("/api/") and site in ("cross-site", "same-site"):
            return 403, (
                f"a request from another site (Sec-Fetch-Site: {site}) is refused; the "
                "API answers this server's own page and clients that are not browsers"
            )
        if self.hosts is not None and host_name(host) not in self.hosts:
            allowed = ", ".join(sorted(self.hosts))
            return 403, (
                f"Host {host!r} is not this server's name (it answers {allowed}); "
                "a page that reaches 127.0.0.1 under another name is refused"
            )
        size = headers.get("content-length", "")
        if size.isdigit() and int(size) > self.max_body:
            return 413, self._too_large(size)
        return None

    def _too_large(self, size: str) -> str:
        return f"request body has {size} bytes; the limit is {self.max_body} bytes"


class Headers:
    """ASGI middleware: :data:`SECURITY_HEADERS` on every HTTP answer (one the app set
    itself is kept), a 500 for an error the app raised included.

    Example:
        >>> from starlette.applications import Starlette
        >>> from starlette.testclient import TestClient
        >>> r = TestClient(Headers(Starlette())).get("/nowhere")  # a 404 gets them too
        >>> r.status_code, r.headers["x-content-type-options"]
        (404, 'nosniff')
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.extra = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        started = False

        async def headed(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                have = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in self.extra if k not in have]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        try:
            await self.app(scope, receive, headed)
        except Exception:  # the server's own 500 would be answered outside this middleware
            if not started:
                await _answer(headed, 500, "internal server error")
            raise  # (the server logs it; an answer begun is not answered twice)


class HeadAsGet:
    """ASGI middleware: ``HEAD`` answered as ``GET`` is, headers only (FastAPI routes a
    GET for GET alone, so ``curl -I`` got 405); a POST-only route still answers 405.

    Example:
        >>> from starlette.applications import Starlette
        >>> from starlette.responses import PlainTextResponse
        >>> from starlette.routing import Route
        >>> from starlette.testclient import TestClient
        >>> async def hello(request): return PlainTextResponse("hello")
        >>> app = Starlette(routes=[Route("/", hello, methods=["GET"])])
        >>> r = TestClient(HeadAsGet(app)).head("/")
        >>> r.status_code, r.headers["content-length"], r.content
        (200, '5', b'')
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def headless(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headless)


async def _answer(send: Send, status: int, detail: str) -> None:
    """A JSON ``{"detail": ...}`` answer, the shape of every other error of the API."""
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
