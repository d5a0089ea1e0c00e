"""``attnlab serve``: the local explorer, a web page to look inside attention.

Serves the page and its JSON API (FastAPI under uvicorn) on 127.0.0.1 by default; any
other host needs ``--allow-remote`` and prints a warning, since the API runs models for
whoever can reach it. On loopback it answers only requests whose ``Host`` names this
machine (or a name given by ``--allow-host``, a reverse proxy's): a foreign page behind
a name rebound to 127.0.0.1 gets 403. The host and port
are checked before anything loads, and a ``--model`` folder is loaded before the server
starts, so a bad host, a busy port or a folder without a model is one line and exit
status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
from typing import Any

from attnlab._hosts import LOOPBACK_HOSTS, is_host
from attnlab.cli._args import check_in_folder, int_in
from attnlab.cli._errors import UsageError, warn
from attnlab.cli._paths import user_path
from attnlab.cli._sentence import add_model_option, load_encoder

__all__ = ["add_parsers", "run"]

# bind errors of the address, not the port: not this machine's, or its family unsupported
_HOST_ERRNOS = {errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT}
# seconds that Ctrl-C leaves unfinished requests (a body still coming) before dropping them
GRACE_S = 2.0


def add_parsers(sub: Any) -> None:
    """Add the ``serve`` subcommand to an argparse subparsers object."""
    p = sub.add_parser("serve", help="a local web page to explore attention (attnlab[serve])")
    add_model_option(p)
    p.add_argument(
        "--runs",
        type=user_path,
        default=None,
        help="list the task checkpoints found in this folder",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    p.add_argument(
        "--port",
        type=int_in(0, 65535),
        default=8000,
        help="port to listen on, 0 for any free one (default %(default)s)",
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host name to answer besides this machine's (a reverse proxy's; repeatable)",
    )
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a --host other than loopback (anyone who reaches it can run models)",
    )
    p.set_defaults(run=run)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_host(host: str) -> None:
    """``host`` is an IP address or a name this machine resolves (a usage error if not)."""
    if host == "localhost":
        return
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        why = f"{host!r} is not an IP address or a host name this machine resolves"
        raise UsageError("--host", f"{why} ({getattr(e, 'strerror', None) or e})") from e


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (uvicorn serves on it); a usage error naming
    ``--host`` (an address this machine does not have) or ``--port`` (busy, or not
    allowed) if it cannot."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:  # no IPv6 on this machine
        raise UsageError("--host", f"cannot listen on {host} ({e.strerror or e})") from e
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit it
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        host_fault = isinstance(e, socket.gaierror) or e.errno in _HOST_ERRNOS
        where = "--host" if host_fault else "--port"
        raise UsageError(where, f"cannot listen on {host}:{port} ({e.strerror or e})") from e
    sock.listen(2048)  # connections wait from now on, before uvicorn starts accepting
    return sock


def _encoder(args: argparse.Namespace, sock: socket.socket) -> Any:
    """The ``--model`` encoder, loaded before the server starts (None: the default one,
    loaded as the server starts); a folder without a model is a usage error."""
    if args.model is None:
        return None
    try:
        return load_encoder(args.model)[0]
    except BaseException:
        sock.close()
        raise


def _check_allow_host(names: list[str]) -> None:
    """Each ``--allow-host`` is a host name or an IP address, as a ``Host`` header names
    it (an optional ``:port`` is ignored there): ``""`` or ``http://proxy`` could never
    match a request, so they are usage errors, not silently unused names."""
    for name in names:
        if not is_host(name):
            raise UsageError(
                "--allow-host", f"{name!r} is not a host name or an IP address (e.g. proxy.lan)"
            )


def _check_args(args: argparse.Namespace) -> None:
    """``--host`` (and ``--allow-remote``), ``--allow-host``, ``--model`` and ``--runs``,
    before any work."""
    _check_host(args.host)
    _check_allow_host(args.allow_host)
    if not _is_loopback(args.host) and not args.allow_remote:
        raise UsageError(
            "--host",
            f"{args.host!r} is not loopback; add --allow-remote to serve beyond this machine",
        )
    if args.model is not None:
        check_in_folder("--model", args.model)
    if args.runs is not None:
        check_in_folder("--runs", args.runs)


def run(args: argparse.Namespace) -> int:
    """``attnlab serve``."""
    _check_args(args)
    try:
        import uvicorn

        from attnlab.serve import create_app
    except ModuleNotFoundError as e:
        if "attnlab[serve]" in str(e):  # (attnlab.serve names it)
            raise
        raise ModuleNotFoundError(f"{e}; pip install 'attnlab[serve]'") from e
    sock = _bind(args.host, args.port)
    encoder = _encoder(args, sock)
    if not _is_loopback(args.host):
        warn(args, f"serving on {args.host}: anyone who can reach it can run models here")
    # on loopback, only requests that name this machine (not a rebound foreign name)
    hosts = (*LOOPBACK_HOSTS, args.host, *args.allow_host) if _is_loopback(args.host) else None
    app = create_app(args.model, args.runs, encoder=encoder, hosts=hosts)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/"
    server = _ready_server(
        uvicorn, app, f"attnlab serve: {url}  (API schema: /openapi.json; Ctrl-C stops)"
    )
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn shut down, then re-raised Ctrl-C
        server.run(sockets=[sock])
    print("attnlab serve: stopped", flush=True)
    return 0


def _ready_server(uvicorn: Any, app: Any, line: str) -> Any:
    """A uvicorn server that prints ``line`` (the URL) once it is serving, the model
    loaded: uvicorn's Ctrl-C handler is in place by then, so a Ctrl-C sent on seeing the
    line stops it (the line used to come before uvicorn started).

    Ctrl-C gives unfinished requests :data:`GRACE_S` seconds, then uvicorn cancels them:
    each gets a 503 and its connection closes. (Without the limit, a client that sent
    half a body kept the server running for as long as it held the socket, silently; a
    second Ctrl-C then printed a 124-line ``CancelledError`` traceback.)"""

    class Ready(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                print(line, flush=True)

    server: Any = None

    async def stoppable(scope: Any, receive: Any, send: Any) -> None:
        try:
            await app(scope, receive, send)
        except asyncio.CancelledError:
            if scope["type"] != "http" or not server.should_exit:
                raise
            await _stopping(send)  # cancelled by the stop: an answer, not a traceback

    config = uvicorn.Config(stoppable, log_level="warning", timeout_graceful_shutdown=GRACE_S)
    logging.getLogger("uvicorn.error").addFilter(_not_cancel_notice)
    server = Ready(config)
    return server


def _not_cancel_notice(record: logging.LogRecord) -> bool:
    """Drop uvicorn's "Cancel N running task(s), timeout graceful shutdown exceeded"
    (an ERROR line on every Ctrl-C with a request open): the stop is the expected one."""
    return "timeout graceful shutdown exceeded" not in str(record.msg)


async def _stopping(send: Any) -> None:
    """A 503 for a request that the stop cut short (ignored if its client is gone, or
    if its answer had begun: uvicorn then closes the connection)."""
    body = b'{"detail": "the server is stopping"}'
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    with contextlib.suppress(Exception):
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})
