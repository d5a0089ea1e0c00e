"""The scripts under ``examples/`` are what users copy: they import attnlab's public API
only (no module or name with a leading underscore, every name in its module's
``__all__``). Running them is tested beside what they show (``test_distributed_train``,
``test_hf_models``)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))


def _attnlab_imports(path: Path) -> list[tuple[str, str | None]]:
    """(module, name) of every attnlab import in ``path``; name None for ``import m``."""
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.split(".")[0] == "attnlab"]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "attnlab":
            found += [(node.module or "", a.name) for a in node.names]
    return found


def _private(module: str, name: str | None) -> str | None:
    """Why ``from module import name`` is not public API, or None."""
    if any(part.startswith("_") for part in module.split(".")):
        return f"{module} is a private module"
    if name is None:
        return None
    if name.startswith("_"):
        return f"{module}.{name} is a private name"
    public = getattr(importlib.import_module(module), "__all__", None)
    if public is not None and name not in public:
        return f"{module}.{name} is not in {module}.__all__"
    return None


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 2, EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_an_example_imports_only_public_api(path: Path) -> None:
    """(``examples/hf_backend.py`` and ``context_parallel_lm.py`` imported
    ``attnlab.cli._args.script_parser``, ``_errors.UsageError`` and ``_sentence``'s
    checks: a copied example broke when those changed.)"""
    imports = _attnlab_imports(path)
    assert imports, f"{path.name} imports nothing from attnlab"
    bad = [why for m, n in imports if (why := _private(m, n)) is not None]
    assert not bad, f"{path.name}: {bad}"
