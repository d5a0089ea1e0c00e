"""The explorer's FastAPI app: the page, its assets, and the JSON API under ``/api``.

Every model call runs on one worker thread (:class:`~attnlab.serve.jobs.Worker`), off the
event loop; slow explanations run as jobs with progress and cancel. Request bodies are
decoded and validated on a worker thread too (:class:`~attnlab.serve.bodies.ReadOffLoop`).
The last few inputs' attention is kept, so moving between layers and heads does not
recompute it.

Example:
    >>> from fastapi.testclient import TestClient
    >>> with TestClient(create_app()) as client:
    ...     r = client.post("/api/attend", json={"text": "Cats purr.", "layer": 5, "head": 3})
    >>> r.status_code, r.json()["head"]["n_queries"], len(r.json()["thumbs"])
    (200, 6, 6)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

import attnlab
from attnlab.interpret.report import KEYS_JS
from attnlab.serve import payload
from attnlab.serve.bodies import ReadOffLoop
from attnlab.serve.guard import Guard, HeadAsGet, Headers
from attnlab.serve.jobs import Job, Worker
from attnlab.serve.limits import (
    ApiError,
    Limits,
    check_range,
    check_text,
    decode_image,
    refused_input,
)
from attnlab.serve.payload import AttendIn, CompareIn, ExplainIn, Side
from attnlab.serve.registry import Registry

__all__ = ["STATIC", "create_app"]

STATIC = Path(__file__).with_name("static")
CACHE = 6  # inputs whose attention is kept
_STEPPED = ("integrated",)  # the explanations that take ``steps`` (integrated gradients)


class Explorer:
    """The app's state: models, limits, the worker and the attention cache."""

    def __init__(self, registry: Registry, limits: Limits) -> None:
        self.registry, self.limits = registry, limits
        self.worker = Worker()
        self.cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self.lock = threading.Lock()  # the cache
        self.admitted = 0  # explanations past the max_jobs check, not yet submitted

    @contextmanager
    def admitting(self) -> Iterator[None]:
        """Hold one of ``max_jobs`` slots while a job is checked and submitted (event loop
        only); ApiError 429 when queued, running and admitted jobs fill them."""
        cap = self.limits.max_jobs
        if self.worker.active() + self.admitted >= cap:
            raise ApiError(
                429, f"{cap} jobs are queued or running (max_jobs={cap}); wait or cancel one"
            )
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    async def run(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on the worker thread, awaited without blocking the event loop."""
        with _serving():
            fut = self.worker.call(fn)
        return await asyncio.wrap_future(fut)

    def submit(self, work: Callable[[Callable[..., None]], Any]) -> Job:
        """``work(report)`` queued as a job on the worker."""
        with _serving():
            return self.worker.submit(work)

    def close(self) -> None:
        """Stop the worker (its threads end) and let go of the attention cache and the
        models' loaded copies (a model asked for again loads again)."""
        self.worker.close()
        with self.lock:
            self.cache.clear()
        self.registry.release()

    def model(self, name: str | None) -> Any:
        try:
            return self.registry.get(name or self.registry.default)
        except KeyError as e:
            raise ApiError(404, str(e.args[0])) from e

    def inspect(self, name: str | None, side: Side | ExplainIn) -> tuple[Any, Any]:
        """(model, inspection) of one input; worker thread only."""
        m, name = self.model(name), name or self.registry.default
        text, image, key = self.read_input(m, side, name)
        cache_key = (name, key)
        with self.lock:
            if cache_key in self.cache:
                self.cache.move_to_end(cache_key)
                return m, self.cache[cache_key]
        if text is not None:
            self.count_tokens(m, text)
        with refused_input():
            ins = m.inspect(text=text, image=image)
        with self.lock:
            self.cache[cache_key] = ins
            while len(self.cache) > CACHE:
                self.cache.popitem(last=False)
        return m, ins

    def count_tokens(self, m: Any, text: str) -> int:
        """``text``'s tokens for model ``m``; ApiError 413 past ``max_tokens``, 422 for a
        text the model cannot read."""
        with refused_input():
            n = int(m.count_tokens(text))
        if n <= _empty_tokens(m):  # (zero-width or control characters: [CLS] [SEP] alone)
            raise ApiError(
                422,
                "text holds no token the model reads (no word, only spaces, control or "
                "zero-width characters); give a text with words",
            )
        if n > self.limits.max_tokens:
            cap = self.limits.max_tokens
            raise ApiError(413, f"text has {n} tokens; the limit is max_tokens={cap}")
        reads = getattr(m, "max_tokens", None)  # (a model that would cut a longer text)
        if reads is not None and n > reads:
            raise ApiError(413, f"text has {n} tokens; the model reads at most {reads}")
        return n

    def read_input(self, m: Any, side: Side | ExplainIn, name: str) -> tuple[str | None, Any, str]:
        """The text or decoded image a request gives, checked against model ``name``'s
        input."""
        kind = m.input  # "text" or "image"
        extra, reads = ("text", "images") if kind == "image" else ("image", "text")
        if getattr(side, kind) is None:
            raise ApiError(422, f"{kind} is required: model {name!r} reads {reads}")
        if getattr(side, extra) is not None:  # (it was dropped without a word)
            raise ApiError(422, f"{extra}: model {name!r} reads {reads}; send no {extra}")
        if side.image is not None:
            digest = hashlib.sha256(side.image.encode()).hexdigest()
            return None, decode_image(self.limits, side.image), "image:" + digest
        text = check_text(self.limits, side.text)
        return text, None, "text:" + text


@contextmanager
def _serving() -> Iterator[None]:
    """ApiError 503 for work handed to a closed worker (a request after the shutdown)."""
    try:
        yield
    except RuntimeError as e:
        raise ApiError(503, f"the explorer has shut down ({e}); start it again") from e


def _empty_tokens(m: Any) -> int:
    """The tokens model ``m`` reads for an empty text (the special ones it adds to any
    text), or 0 where it refuses an empty text."""
    try:
        return int(m.count_tokens(""))
    except (ApiError, TypeError, ValueError):
        return 0


def create_app(
    model: str | Path | None = None,
    runs: str | Path | None = None,
    *,
    limits: Limits | None = None,
    encoder: Any = None,
    hosts: Collection[str] | None = None,
) -> FastAPI:
    """The explorer app over the encoder ``model`` (default: all-MiniLM-L6-v2) and the
    checkpoints under ``runs``; ``encoder`` hands in an already loaded SentenceEncoder;
    ``hosts``: the names a request's ``Host`` may carry (None: any; ``attnlab serve`` on
    loopback gives :data:`~attnlab.serve.guard.LOOPBACK_HOSTS` and its own address).

    Example:
        >>> from fastapi.testclient import TestClient
        >>> app = create_app(limits=Limits(max_top_k=8), hosts=["localhost"])
        >>> with TestClient(app, base_url="http://localhost") as client:
        ...     top_k = client.get("/api/limits").json()["max_top_k"]
        ...     other = client.get("/api/health", headers={"host": "evil.example"})
        >>> top_k, other.status_code  # a Host outside hosts is refused
        (8, 403)
    """
    ex = Explorer(Registry(model, runs, encoder), limits or Limits())
    # no /docs or /redoc: FastAPI's pages load Swagger UI and ReDoc from a CDN, and were
    # blank offline; the schema itself is served, at /openapi.json
    app = FastAPI(
        title="attnlab explorer",
        version=attnlab.__version__,
        lifespan=_lifespan,
        docs_url=None,
        redoc_url=None,
    )
    # the routes are this module's functions, which find the explorer in app.state: FastAPI
    # keeps every endpoint in its global caches, and endpoints made here, closures over
    # the explorer, kept each app's models alive (100 MB a copy) after it was dropped
    app.state.explorer = ex
    _errors(app)
    app.include_router(_ROUTER)  # (its ReadOffLoop routes read JSON bodies off the loop)
    app.add_middleware(HeadAsGet)  # innermost: the Guard and Headers see the HEAD
    # bodies past the upload limit (as base64, in JSON) refused as they arrive
    app.add_middleware(Guard, max_body=ex.limits.max_upload_bytes * 4 // 3 + 65536, hosts=hosts)
    app.add_middleware(Headers)  # outermost: the Guard's refusals carry them too
    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _errors(app: FastAPI) -> None:
    """One-line ``detail`` for every error; a body FastAPI cannot parse is a 422 too."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse({"detail": e.detail}, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": payload.one_line(e.errors())}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> Any:
        cause = e.__cause__
        if e.status_code != 400 or cause is None:
            return await http_exception_handler(request, e)
        # "There was an error parsing the body": not UTF-8, nested too deep, a huge number
        why = " ".join(str(cause).split())[:120] or type(cause).__name__
        return JSONResponse({"detail": f"body is not JSON that can be read ({why})"}, 422)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load the default model before serving; at the end stop the worker and let go of
    the models' copies. (An app never served starts no thread; one dropped unserved
    stops its threads as its worker is collected.)"""
    ex: Explorer = app.state.explorer
    ex.worker.reopen()  # (served again after a shutdown)
    loading = ex.worker.call(ex.registry.get(ex.registry.default).load)
    # served (and the URL printed) once the model is loaded; a failed load is the first
    # text's error, as a later load's is
    with contextlib.suppress(Exception):
        await asyncio.wrap_future(loading)
    yield
    ex.close()


_ROUTER = APIRouter(route_class=ReadOffLoop)


def _ex(request: Request) -> Explorer:
    """The explorer of the app serving ``request``."""
    return request.app.state.explorer


def _routes(app: APIRouter) -> None:
    """The page, its assets and the API, on ``app`` (each endpoint finds its app's
    explorer in the request)."""

    @app.get("/", include_in_schema=False)
    async def index() -> Any:
        page = STATIC / "index.html"
        if page.is_file():
            return FileResponse(page)
        msg = "attnlab explorer: the page is missing; the API's schema is at /openapi.json"
        return PlainTextResponse(msg)

    @app.get("/static/keys.js", include_in_schema=False)
    async def keys_js() -> Any:  # the tokens' keyboard focus, shared with the HTML report
        return FileResponse(KEYS_JS, media_type="text/javascript")

    @app.get("/api/health")
    async def health() -> dict[str, Any]:
        return {"ok": True, "version": attnlab.__version__}

    @app.get("/api/limits")
    async def limits(request: Request) -> dict[str, int]:
        return _ex(request).limits.as_dict()

    @app.get("/api/models")
    async def models(request: Request) -> dict[str, Any]:
        ex = _ex(request)
        return {"models": ex.registry.info(), "default": ex.registry.default}

    @app.get("/api/models/{name:path}")
    async def model_info(name: str, request: Request) -> dict[str, Any]:
        """One model, loaded now if it was not (so its ``example`` is known)."""
        ex = _ex(request)
        if not name:  # the default model's name is not "" (a 500: StopIteration below)
            raise ApiError(404, "no model named ''; GET /api/models lists them")
        m = ex.model(name)
        await ex.run(lambda: _load(m))
        return next(i for i in ex.registry.info() if i["name"] == name)

    @app.post("/api/attend")
    async def attend(body: AttendIn, request: Request) -> dict[str, Any]:
        """Attention of one input: its stacks, the thumbnails, the chosen head."""
        ex = _ex(request)
        _check_view(ex.limits, body)

        def work() -> dict[str, Any]:
            t0 = time.perf_counter()
            ins = ex.inspect(body.model, body)[1]
            out = payload.attend(ins, body, model=body.model or ex.registry.default)
            return out | {"seconds": round(time.perf_counter() - t0, 4)}

        return await ex.run(work)

    @app.post("/api/compare")
    async def compare(body: CompareIn, request: Request) -> dict[str, Any]:
        """Two inputs (or two models), the same head, and their difference."""
        ex = _ex(request)
        _check_view(ex.limits, body)

        def work() -> dict[str, Any]:
            t0 = time.perf_counter()
            a = ex.inspect(body.a.model, body.a)[1]
            b = ex.inspect(body.b.model, body.b)[1]
            out = payload.compare(a, b, body, ex.registry.default)
            return out | {"seconds": round(time.perf_counter() - t0, 4)}

        return await ex.run(work)

    @app.post("/api/explain", status_code=202)
    async def explain(body: ExplainIn, request: Request) -> dict[str, Any]:
        """Start a slow explanation as a job; poll ``GET /api/jobs/{id}``."""
        ex = _ex(request)
        sent = set(body.model_fields_set)  # (before _check_view fits the fields left out)
        _check_view(ex.limits, body)
        if body.method in _STEPPED or "steps" in sent:
            check_range("steps", body.steps, 2, ex.limits.max_steps, "max_steps")
        m = ex.model(body.model)
        _check_method(m, body, body.model or ex.registry.default)
        text = check_text(ex.limits, body.text)
        with ex.admitting():  # a slot held from here: requests at once cannot pass max_jobs
            tokens = await ex.run(lambda: _check_tokens(ex, body, body.method))

            def work(report: Callable[..., None]) -> dict[str, Any]:
                return m.explain(
                    text, body.method, steps=body.steps, top_k=body.top_k, report=report
                )

            job = ex.submit(work)
        return {"job": job.id, "state": job.state, "tokens": tokens}

    @app.get("/api/jobs/{job_id}")
    async def job(job_id: str, request: Request) -> dict[str, Any]:
        ex = _ex(request)
        found = ex.worker.job(job_id)
        if found is None:
            raise ApiError(404, f"unknown job {job_id!r} (finished jobs are kept a while)")
        return found.as_dict()

    @app.delete("/api/jobs/{job_id}")
    async def cancel(job_id: str, request: Request) -> dict[str, Any]:
        ex = _ex(request)
        found = ex.worker.job(job_id)
        if found is None:
            raise ApiError(404, f"unknown job {job_id!r}")
        found.cancel()
        return {"job": found.id, "state": found.state}


_routes(_ROUTER)


def _check_view(limits: Limits, body: AttendIn | CompareIn | ExplainIn) -> None:
    """Fit the fields ``body`` left out to the limits, then check its ``top_k``."""
    _fit(body, limits)
    check_range("top_k", body.top_k, 1, limits.max_top_k, "max_top_k")


def _fit(body: AttendIn | CompareIn | ExplainIn, limits: Limits) -> None:
    """A field the request left out takes its default or the limit, the lower one (with
    max_top_k=8, a body without top_k was refused: "top_k must be in 1..8, got 16")."""
    for name, cap in (("top_k", limits.max_top_k), ("steps", limits.max_steps)):
        if name in type(body).model_fields and name not in body.model_fields_set:
            setattr(body, name, min(getattr(body, name), cap))


def _load(m: Any) -> Any:
    """Model ``m`` loaded (worker thread); ApiError 422 if its checkpoint cannot be."""
    with refused_input():
        return m.load()


def _check_method(m: Any, body: ExplainIn, name: str) -> None:
    """ApiError 422 unless ``body.method`` is one of the model's explanations."""
    allowed = [x for x in m.methods if x != "attention"]
    if body.method in allowed:
        return
    if not allowed:
        raise ApiError(
            422,
            f"method: model {name!r} offers no explanation besides its raw attention "
            f"(POST /api/attend), got {body.method!r}",
        )
    raise ApiError(422, f"method must be one of {allowed} for this model, got {body.method!r}")


def _check_tokens(ex: Explorer, body: ExplainIn, method: str) -> int:
    """The text's tokens, within the token limit (and attention flow's), before a job is
    queued; worker thread."""
    m = ex.inspect(body.model, body)[0]  # checks the input (and caches its attention)
    n = ex.count_tokens(m, body.text)
    cap = ex.limits.max_flow_tokens
    if method == "flow" and n > cap:
        raise ApiError(413, f"attention flow reads at most max_flow_tokens={cap} tokens; got {n}")
    return n
