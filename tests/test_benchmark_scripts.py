"""The benchmark scripts' own bookkeeping: error counts, summaries, argument checks."""

from __future__ import annotations

import argparse
import importlib.util
import random
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str) -> Any:
    """``benchmarks/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _FakeProc:
    pid = 1

    def send_signal(self, sig: int) -> None:
        """Nothing to stop."""

    def wait(self, timeout: float | None = None) -> int:
        """Already stopped."""
        return 0


class _FakeClient:
    def __init__(self, port: int) -> None:
        self.port = port

    def call(self, *args: object, **kwargs: object) -> tuple[int, None]:
        """Every request succeeds."""
        return 200, None


def test_load_serve_counts_a_client_exception_once(monkeypatch: Any) -> None:
    """One dropped connection is one error (it was two: its text, then "exception")."""
    ls = _load("load_serve")
    calls = {"n": 0}

    def one_call(client: object, rng: random.Random) -> tuple[str, bool]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionResetError("dropped")
        return ("health", True) if calls["n"] % 2 else ("attend", False)

    monkeypatch.setattr(ls, "start_server", lambda extra: (_FakeProc(), 1))
    monkeypatch.setattr(ls, "Client", _FakeClient)
    monkeypatch.setattr(ls, "one_call", one_call)
    args = argparse.Namespace(serve_args=[], clients=1, seconds=0.05, warmup=0.0, smoke=False)
    s = ls.run(args)
    failed = calls["n"] // 2  # the even calls answer not ok
    assert s["errors"] == 1 + failed
    assert s["first_errors"][:2] == ["ConnectionResetError: dropped", "attend"]
