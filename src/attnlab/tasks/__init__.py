"""Tasks with data generated offline from real-language libraries (no downloads)."""

from __future__ import annotations

__all__: list[str] = []
