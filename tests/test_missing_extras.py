"""What a user without an extra gets: one line that names it. Each case runs in its own
process with the package made unimportable (``sys.modules[name] = None``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def _run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", code, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


_HIDE = "import sys\nfor m in {names!r}: sys.modules[m] = None\n"


def test_serve_without_fastapi_names_the_extra() -> None:
    """It was a traceback ending "No module named 'fastapi'"."""
    res = _run(_HIDE.format(names=["fastapi"]) + "import attnlab.serve")
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].endswith("pip install 'attnlab[serve]'")


def test_register_without_transformers_names_the_extra() -> None:
    code = _HIDE.format(names=["transformers"]) + (
        "from attnlab.integrations.transformers import register\n"
        "try:\n    register()\nexcept ModuleNotFoundError as e:\n    print(e)\n"
    )
    res = _run(code)
    assert res.returncode == 0 and "needs the hf extra: pip install 'attnlab[hf]'" in res.stdout


def test_explain_hf_model_without_transformers_names_the_extra(tmp_path: Path) -> None:
    """It said "No module named 'transformers' (an optional dependency is missing)"."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "bert"}')
    code = _HIDE.format(names=["transformers"]) + (
        "from attnlab.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    res = _run(code, "explain", "hi", "--hf-model", str(tmp_path / "model"), "--out",
               str(tmp_path / "out" / "r.html"))  # fmt: skip
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1, res.stderr
    assert "pip install 'attnlab[hf]'" in lines[0], lines


_SERVE_RUNS = """
from fastapi.testclient import TestClient
from attnlab.serve import create_app
with TestClient(create_app(runs=sys.argv[1])) as c:
    r = c.get("/api/models")
    print(r.status_code, sorted(m["name"] for m in r.json()["models"]))
    r = c.post("/api/attend", json={"text": "[en_US] 11/21/2026", "model": "dates"})
    print(r.status_code, r.json()["detail"])
"""


@pytest.mark.slow
def test_serve_runs_without_babel_lists_the_rest(tmp_path: Path) -> None:
    """A dates checkpoint under --runs where Babel cannot be imported made /api/models
    answer 500 (the page, MiniLM's too, could not load): the listing stands, and the
    model's own requests answer 503 naming what is missing."""
    from tests.task_runs import make_tiny_run

    make_tiny_run("dates", tmp_path / "dates")
    res = _run(_HIDE.format(names=["babel", "babel.dates"]) + _SERVE_RUNS, str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    listing, attend = res.stdout.strip().splitlines()[-2:]
    assert listing == "200 ['dates', 'minilm']", res.stdout
    assert attend.startswith("503 model 'dates' cannot be loaded here: ") and "Babel" in attend
