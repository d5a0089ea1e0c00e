"""attnlab refuses a torch older than it needs (2.9), at import, in one line.

Checked against torch 2.5.1-2.9.0 installed from PyPI: 2.5 and 2.6 failed at
``import attnlab`` with a TypeError from ``torch.compiler.disable(reason=...)``; 2.7 and
2.8 imported, but their per-block flash kernel read past k and v for grouped-query heads
(values like 1e29 or NaN, no error) wherever attnlab's C++ kernel was not built.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

OLD = "import torch; torch.__version__ = torch.torch_version.TorchVersion({v!r}); "


def _run(code: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", code]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("version", ["2.8.0+cpu", "2.5.1"])
def test_import_refuses_an_older_torch_naming_it(version: str) -> None:
    res = _run(OLD.format(v=version) + "import attnlab")
    assert res.returncode == 1
    want = f"ImportError: attnlab needs torch >= 2.9, found torch {version}"
    assert res.stderr.strip().splitlines()[-1] == want, res.stderr


def test_the_command_says_so_in_one_line() -> None:
    code = OLD.format(v="2.8.0") + "import attnlab_launch, sys; sys.exit(attnlab_launch.main())"
    res = _run(code)
    assert res.returncode == 1
    assert res.stderr == "attnlab: error: attnlab needs torch >= 2.9, found torch 2.8.0\n"


def test_a_prerelease_of_the_floor_is_accepted() -> None:
    res = _run(OLD.format(v="2.9.0a0+git1234") + "import attnlab; print('ok')")
    assert res.returncode == 0 and res.stdout == "ok\n", res.stderr
