"""Request bodies decoded and checked on a worker thread, not on the event loop.

FastAPI decodes a POST's JSON and validates it against the route's pydantic model on the
event loop: a 2.5 MB body of 200,000 unknown keys (under the size limit) held every other
request, ``GET /api/health`` too, for 1.3-3 s. A :class:`ReadOffLoop` route does both on
a worker thread first and hands FastAPI the checked model, which FastAPI passes through
as it is; the answers are the ones FastAPI gives (the same status and one-line detail for
a body that is not JSON, a wrong type or unknown keys).

Pydantic holds the GIL while it lists a ``ValidationError``'s errors (0.8 s for 200,000,
which stops the event loop as surely as running there), and the detail names only the
first five. Past :data:`LISTED` errors the first ones come from the body with each
object's unknown keys past the first :data:`LISTED` left out (:func:`first_errors`): pydantic
lists an object's own fields' errors first, then one error per unknown key in order, so
the first errors are the same, and the count is pydantic's own.

Example:
    >>> from attnlab.serve.payload import AttendIn
    >>> from pydantic import ValidationError
    >>> body = {"text": "a", "layer": "2", **{f"k{i}": i for i in range(1000)}}
    >>> try:
    ...     AttendIn.model_validate(body)
    ... except ValidationError as e:
    ...     errors, total = first_errors(AttendIn, body, e)
    >>> total, len(errors), [e["loc"] for e in errors[:3]]
    (1001, 65, [('body', 'layer'), ('body', 'k0'), ('body', 'k1')])
"""

from __future__ import annotations

import email.message
import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from attnlab.serve.limits import ApiError
from attnlab.serve.payload import one_line

__all__ = ["LISTED", "ReadOffLoop", "check_body", "first_errors"]

LISTED = 64  # errors listed in full; past this, each object's first LISTED unknown keys

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class ReadOffLoop(APIRoute):
    """An ``APIRoute`` whose JSON body (a pydantic model) is decoded and validated on a
    worker thread before FastAPI's own handler runs; other routes are left as they are."""

    def get_route_handler(self) -> Handler:
        """FastAPI's handler, after the body is read and checked on a worker thread."""
        handler = super().get_route_handler()
        model = _body_model(self)
        if model is None:
            return handler

        async def read_first(request: Request) -> Response:
            if not _is_json(request.headers.get("content-type")):
                return await handler(request)  # FastAPI validates the bytes: one error
            read = _Checked(request.scope, request.receive)
            try:
                body = await read.body()
            except HTTPException:  # the Guard's 413, as FastAPI lets it through
                raise
            except Exception as e:  # a client gone mid-body: FastAPI's 400
                raise HTTPException(400, "There was an error parsing the body") from e
            if body:
                read.checked = await run_in_threadpool(check_body, model, body)
            return await handler(read)

        return read_first


class _Checked(Request):
    """A request whose body was read and checked: ``json()`` is the validated model."""

    checked: BaseModel | None = None

    async def json(self) -> Any:
        if self.checked is None:
            return await super().json()
        return self.checked


def check_body(model: type[BaseModel], body: bytes) -> BaseModel:
    """``body`` (JSON) as a ``model``, raising what FastAPI's own reading answers: a
    ``RequestValidationError`` for JSON that does not decode, an ``HTTPException`` 400 for
    a body that cannot be read (not UTF-8, nested too deep), and, for a body the model
    refuses, an ApiError 422 with the one-line detail of its validation errors."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError as e:
        error = {
            "type": "json_invalid",
            "loc": ("body", e.pos),
            "msg": "JSON decode error",
            "input": {},
            "ctx": {"error": e.msg},
        }
        raise RequestValidationError([error], body=e.doc) from e
    except Exception as e:
        raise HTTPException(400, "There was an error parsing the body") from e
    try:
        return model.model_validate(value, from_attributes=True)
    except ValidationError as e:
        detail = one_line(*first_errors(model, value, e))
    del value  # freed here, on this thread, not where the answer is sent
    raise ApiError(422, detail)


def first_errors(
    model: type[BaseModel], value: Any, error: ValidationError
) -> tuple[list[dict[str, Any]], int]:
    """The first errors of ``error``, the ``ValidationError`` of ``value`` as a ``model``
    (at least :data:`LISTED` of them when there are more; each ``loc`` under ``"body"``,
    as FastAPI gives them), and how many there are in all."""
    total = error.error_count()
    if total > LISTED:
        short, dropped = _without_extra_keys(model, value)
        try:
            model.model_validate(short, from_attributes=True)
        except ValidationError as part:
            if part.error_count() + dropped == total:  # else every error is listed
                error = part
    errors = error.errors(include_url=False)
    return [{**err, "loc": ("body", *err["loc"])} for err in errors], total


def _without_extra_keys(model: type[BaseModel], value: Any) -> tuple[Any, int]:
    """``value`` with each object's unknown keys past the first :data:`LISTED` left out
    (in ``model`` and the models of its fields); how many were left out."""
    if not isinstance(value, dict):
        return value, 0
    known: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        known[name] = known[field.alias or name] = field.annotation
    kept: dict[str, Any] = {}
    unknown = dropped = 0
    for key, item in value.items():
        if key not in known:
            unknown += 1
            if unknown > LISTED:
                dropped += 1
                continue
        elif isinstance(known[key], type) and issubclass(known[key], BaseModel):
            item, n = _without_extra_keys(known[key], item)
            dropped += n
        kept[key] = item
    return kept, dropped


def _body_model(route: APIRoute) -> type[BaseModel] | None:
    """The pydantic model a route's endpoint takes as its whole JSON body, or None."""
    field, params = route.body_field, route.dependant.body_params
    if field is None or len(params) != 1 or params[0] is not field:  # FastAPI's Body_* model
        return None  # of several body parameters, or of one with embed=True
    model = field.field_info.annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _is_json(content_type: str | None) -> bool:
    """Whether FastAPI reads a body of this ``Content-Type`` as JSON."""
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )
