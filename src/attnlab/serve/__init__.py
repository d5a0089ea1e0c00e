"""The local explorer: ``attnlab serve``, a FastAPI app over :mod:`attnlab.interpret`,
the sentence encoder and trained task checkpoints (``pip install attnlab[serve]``).

:func:`create_app` builds the app; the page (``static/``) and scripts use its JSON API
under ``/api`` (its OpenAPI schema is at ``/openapi.json``; no ``/docs`` page, which
would load Swagger UI from a CDN).
"""

from __future__ import annotations

try:
    from attnlab.serve.app import create_app
    from attnlab.serve.limits import Limits
except ModuleNotFoundError as e:  # (a traceback ending "No module named 'fastapi'")
    if e.name not in ("fastapi", "starlette", "pydantic", "uvicorn", "PIL"):
        raise
    why = f"{e}; attnlab.serve needs the serve extra: pip install 'attnlab[serve]'"
    raise ModuleNotFoundError(why, name=e.name) from e

__all__ = ["Limits", "create_app"]
