"""``attnlab serve`` as a user starts it: a real process on 127.0.0.1, its API over HTTP,
one-line errors before anything loads, and a clean stop on Ctrl-C."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from attnlab.cli import main
from attnlab.cli._errors import UsageError
from attnlab.cli.serve import _check_allow_host

pytest.importorskip("fastapi")


def _serve(*extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "attnlab.cli", "serve", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_remote_host_needs_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--allow-remote" in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_an_allow_host_no_request_could_carry_is_one_line() -> None:
    """(``--allow-host ""`` was accepted, and served as if it named nothing; a server
    that starts runs until the subprocess timeout fails the test.)"""
    r = _serve("--port", "0", "--allow-host", "proxy.test", "--allow-host", "")
    assert r.returncode == 2 and r.stdout == "", r.stdout
    err = r.stderr.strip()
    assert "--allow-host" in err and "''" in err and len(err.splitlines()) == 1
    for name in ("http://proxy.test", "proxy test", "x..y", ":80", "-x", "[::1]x"):
        with pytest.raises(UsageError, match=re.escape(repr(name))):
            _check_allow_host([name])
    for name in ("proxy.test:8080", "[::1]:80", "::1", "10.0.0.1", "my-host.lan."):
        _check_allow_host([name])


def test_allow_host_is_read_as_the_guard_reads_it_without_the_server() -> None:
    """``--allow-host`` and the guard parse names with one function (``attnlab._hosts``),
    and refusing a name imports no server module."""
    from attnlab.serve.guard import host_name

    names = {"Proxy.Test:8080": "proxy.test", "[::1]:80": "::1", "10.0.0.1": "10.0.0.1"}
    for name, host in names.items():
        _check_allow_host([name])
        assert host_name(name) == host  # the name a request's Host header must carry
    code = (
        "import sys\nfrom attnlab.cli.serve import _check_allow_host\n"
        "try:\n    _check_allow_host(['http://x'])\nexcept Exception as e:\n    print(e)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('starlette', 'fastapi')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.splitlines()[-1] == "[]" and "'http://x'" in out.stdout, out


def test_busy_port_and_missing_folders_are_one_line(tmp_path: object) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = _serve("--port", str(port))
    assert r.returncode == 2 and f"127.0.0.1:{port}" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""
    r = _serve("--runs", "/no/such/folder")
    assert r.returncode == 2 and "--runs" in r.stderr and "does not exist" in r.stderr
    assert main(["serve", "--port", "70000"]) == 2


def test_serves_on_loopback_and_stops_on_ctrl_c() -> None:
    cmd = [
        sys.executable,
        "-m",
        "attnlab.cli",
        "serve",
        "--port",
        "0",
        "--allow-host",
        "proxy.test",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("attnlab serve: http://127.0.0.1:"), line
        url = line.split()[2]
        with urllib.request.urlopen(url + "api/health", timeout=60) as r:
            assert json.load(r)["ok"] is True
        with urllib.request.urlopen(url + "api/models", timeout=60) as r:  # (was False)
            assert json.load(r)["models"][0]["loaded"] is True  # the URL came after the load
        req = urllib.request.Request(
            url + "api/attend",
            data=json.dumps({"text": "Hello there."}).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            assert json.load(r)["stacks"][0]["queries"] == ["[CLS]", "hello", "there", ".", "[SEP]"]
        port = url.rstrip("/").rsplit(":", 1)[1]
        rebound = urllib.request.Request(
            url + "api/health", headers={"Host": f"rebind.test:{port}"}
        )
        with pytest.raises(urllib.error.HTTPError) as refused:  # DNS rebinding
            urllib.request.urlopen(rebound, timeout=60)
        assert refused.value.code == 403
        for name in ("localhost", "proxy.test"):  # this machine's name, and --allow-host's
            named = urllib.request.Request(url + "api/health", headers={"Host": f"{name}:{port}"})
            with urllib.request.urlopen(named, timeout=60) as r:
                assert json.load(r)["ok"] is True
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def _stops_cleanly(proc: subprocess.Popen[str], signum: int) -> None:
    """``signum`` stops the server: exit 0, "stopped", nothing on stderr."""
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and out == "attnlab serve: stopped\n", (out, err)
    assert err == "", err


def test_allow_remote_binds_and_warns() -> None:
    """Ctrl-C as soon as the URL is read stops the server, exit 0. (The URL came before
    uvicorn started: a Ctrl-C then exited 130 as "interrupted", or 0 with "coroutine
    'Server.serve' was never awaited"; in the full suite the server still ran 30 s later
    and the test, which did not check the exit, killed it.)"""
    cmd = [sys.executable, "-m", "attnlab.cli", "serve", "--host", "0.0.0.0", "--port", "0"]
    proc = subprocess.Popen(
        [*cmd, "--allow-remote"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()
        assert line.startswith("attnlab serve: http://0.0.0.0:"), line
        warning = proc.stderr.readline()
        assert "warning" in warning and "anyone who can reach it" in warning
        _stops_cleanly(proc, signal.SIGINT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_ctrl_c_stops_with_a_request_half_sent() -> None:
    """A client that sent a POST's headers and one byte of its 100-byte body: the first
    Ctrl-C stops the server within seconds, exit 0, one line, and the client gets a 503.
    (The server kept running, silently, for as long as the client held the socket; a
    second Ctrl-C exited 0 with a 124-line ``CancelledError`` traceback.)"""
    cmd = [sys.executable, "-m", "attnlab.cli", "serve", "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        port = int(re.search(r":(\d+)/", line).group(1))  # type: ignore[union-attr]
        with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
            head = (
                "POST /api/attend HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
            )
            client.sendall(head.encode())
            time.sleep(0.5)  # the server is reading the body
            start = time.monotonic()
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=15)
            took = time.monotonic() - start
            answer = client.recv(4096)
        assert proc.returncode == 0 and out == "attnlab serve: stopped\n", (out, err)
        assert "Traceback" not in err and err == "", err
        assert took < 10, took
        assert answer.startswith(b"HTTP/1.1 503"), answer
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def _head(url: str) -> tuple[int, str, bytes]:
    """``curl -I URL``: the status, Content-Length and body (none) of a HEAD."""
    req = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers.get("content-length", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-length", ""), e.read()


def test_head_is_answered_as_get_and_sigterm_stops_as_ctrl_c_does() -> None:
    """``curl -I`` got 405 for the page and every GET route (FastAPI routes GET only).
    SIGTERM, a supervisor's stop, is the server's normal end as Ctrl-C is: exit 0 and
    "stopped" (README's table said 143, the code's and the docs' serve section 0)."""
    cmd = [sys.executable, "-m", "attnlab.cli", "serve", "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split()[2]
        for path in ("", "api/health", "static/app.js"):
            with urllib.request.urlopen(url + path, timeout=60) as r:
                got = r.read()
            status, length, body = _head(url + path)
            assert (status, body) == (200, b"") and length == str(len(got)), path
        assert _head(url + "api/attend")[0] == 405  # POST only
        assert _head(url + "nowhere")[0] == 404
        _stops_cleanly(proc, signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
