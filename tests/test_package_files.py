"""What the package declares it ships: the MIT notice its license names, and the pictures
the README (the long description) links."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_declared_mit_license_ships() -> None:
    """(pyproject said license = "MIT" but no LICENSE was in the repository, the sdist or
    the wheel: the notice MIT asks to be included was missing.)"""
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'license = "MIT"' in pyproject and 'license-files = ["LICENSE"]' in pyproject
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n\nCopyright (c) 2026 the attnlab developers\n")
    assert "The above copyright notice and this permission notice shall be included" in text


def test_the_readmes_pictures_are_in_the_sdist() -> None:
    """(MANIFEST.in left docs/ out, so the long description's image links were broken.)"""
    linked = set(re.findall(r"\(?(docs/[\w./-]+\.png)", (ROOT / "README.md").read_text()))
    assert linked and all((ROOT / p).is_file() for p in linked)
    lines = (ROOT / "MANIFEST.in").read_text().splitlines()
    assert "recursive-include docs *.png" in lines and "include LICENSE" in lines
