"""Host names as a ``Host`` header carries them: parsed for the explorer's guard
(:mod:`attnlab.serve.guard`) and checked for ``attnlab serve --allow-host``.

Only the standard library: the command refuses a bad name before it imports the server.

Example:
    >>> host_name("[::1]:8000"), host_name("LocalHost:80"), host_name("127.0.0.1")
    ('::1', 'localhost', '127.0.0.1')
    >>> is_host("proxy.lan:8080"), is_host("http://proxy.lan"), is_host("")
    (True, False, False)
"""

from __future__ import annotations

import contextlib
import ipaddress
import re

__all__ = ["LOOPBACK_HOSTS", "host_name", "is_host", "split_host"]

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

# a DNS name as a Host header carries it: dot-separated labels of letters, digits and "-"
_NAME = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*\.?", re.I)


def split_host(value: str) -> tuple[str, str | None]:
    """``(host, port)`` of a ``Host`` header's value as written (no case change): IPv6
    brackets removed, ``port`` ``""`` when there is none and ``None`` when what follows
    the host is not a port number (``"[::1"``, ``"[::1]x"``, ``"http://proxy"``)."""
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return value[1:], None
        host, port = value[1:end], value[end + 1 :].removeprefix(":")
    elif value.count(":") == 1:
        host, port = value.split(":")
    else:  # a name, or an IPv6 address without brackets
        return value, ""
    return host, port if port.isdigit() or not port else None


def host_name(header: str) -> str:
    """The host of a ``Host`` header, lower case, without its port or IPv6 brackets."""
    return split_host(header.strip().lower())[0]


def is_host(value: str) -> bool:
    """Whether ``value`` is a host name or an IP address, with an optional ``:port``, as
    a ``Host`` header can carry it (``""`` or ``"http://proxy"`` never can)."""
    host, port = split_host(value)
    host = value if port is None else host
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return True
    return len(host) <= 253 and _NAME.fullmatch(host) is not None
