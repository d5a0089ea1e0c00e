"""The explorer app's worker threads and models over its life: none started before the
first request, all stopped and let go of once the app is shut down or dropped."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from typing import Any

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from attnlab.models.sentence import _toy_encoder
from attnlab.serve import create_app

BODY = {"text": "The cat sat.", "layer": 0, "head": 0, "top_k": 3, "thumbs": False}


def _new_threads(before: set[threading.Thread], wait: float = 5.0) -> list[str]:
    """Names of the worker threads alive now that were not in ``before`` (after up to
    ``wait`` seconds for them to end)."""
    end = time.monotonic() + wait
    while True:
        now = threading.enumerate()
        new = [t.name for t in now if t not in before and t.name.startswith("attnlab-")]
        if not new or time.monotonic() > end:
            return new
        time.sleep(0.02)


def _gone(ref: weakref.ref[Any], wait: float = 5.0) -> bool:
    """Whether ``ref``'s object is collected (within ``wait`` seconds: a worker thread
    drops its last task, which holds the app's work, just after the task has answered the
    request, so a loaded machine could find it still held for a moment)."""
    end = time.monotonic() + wait
    while True:
        gc.collect()
        if ref() is None or time.monotonic() > end:
            return ref() is None
        time.sleep(0.02)


def test_an_app_never_served_through_its_lifespan_leaves_no_thread() -> None:
    """(Each ``create_app`` started two worker threads, stopped only at the lifespan's
    end: five apps used by a ``TestClient`` without ``with`` left 11 threads and five
    explorers, 465 -> 879 MiB.) No thread until the first request; a dropped app's
    threads end and its explorer is collected."""
    enc = _toy_encoder()
    before = set(threading.enumerate())
    refs = []
    for i in range(3):
        app = create_app(encoder=enc)
        assert _new_threads(before, wait=0) == [], "threads started before any request"
        refs.append(weakref.ref(app.state.explorer))
        client = TestClient(app)
        r = client.post("/api/attend", json={**BODY, "text": f"The cat sat {i}."})
        assert r.status_code == 200, r.text
        assert sorted(_new_threads(before, wait=0)) == ["attnlab-jobs", "attnlab-quick"]
        client.close()
        del app, client
        assert _gone(refs[-1]) and _new_threads(before) == []


def test_a_shut_down_app_is_collected_with_its_models() -> None:
    """(A served app, dropped after its shutdown, stayed alive with its model copy: its
    routes were closures over the explorer, which FastAPI keeps in global caches; six
    apps, six explorers, +100 MiB each.) No thread is left after the shutdown, and the
    dropped app's explorer and the models' copies are collected."""
    before = set(threading.enumerate())
    app = create_app(encoder=_toy_encoder())
    with TestClient(app) as c:
        assert c.post("/api/attend", json=BODY).status_code == 200
        job = c.post("/api/explain", json={"text": "Cats purr.", "method": "rollout"})
        assert job.status_code == 202, job.text
        copies = list(app.state.explorer.registry.get("minilm")._models.values())
        assert len(copies) >= 1
    assert _new_threads(before) == []
    refs = [weakref.ref(app.state.explorer), weakref.ref(app)]
    refs += [weakref.ref(m.network) for m in copies]
    del app, c, copies, job
    assert [_gone(r) for r in refs] == [True] * len(refs)


def test_a_shut_down_app_refuses_work_until_served_again() -> None:
    """A request after the shutdown is a 503 (no thread is started for it); serving
    again works, and stops its threads at its end."""
    before = set(threading.enumerate())
    app = create_app(encoder=_toy_encoder())
    with TestClient(app) as c:
        assert c.post("/api/attend", json=BODY).status_code == 200
    r = c.post("/api/attend", json=BODY)  # (no lifespan: the worker stays closed)
    assert r.status_code == 503 and "has shut down" in r.json()["detail"], r.text
    assert _new_threads(before, wait=0) == []
    with TestClient(app) as c:  # served again
        assert c.post("/api/attend", json=BODY).status_code == 200
    assert _new_threads(before) == []
