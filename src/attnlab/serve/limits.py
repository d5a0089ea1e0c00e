"""The explorer's input limits, the error it answers past them, and image decoding.

Past a size limit (characters, tokens, upload bytes, image side or pixels) the API
answers 413; a value out of range or of the wrong kind gets 422, and so does an input the
model itself refuses (:func:`refused_input`). Either way the body is ``{"detail": one
line}`` naming the field, what was seen and the limit, and the server keeps serving.

Example:
    >>> Limits().max_tokens
    512
    >>> try:
    ...     check_text(Limits(max_chars=5), "a longer text")
    ... except ApiError as e:
    ...     print(e.status, e.detail)
    413 text has 13 characters; the limit is max_chars=5
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from attnlab._scalars import plain_fields

__all__ = [
    "IMAGE_FORMATS",
    "ApiError",
    "Limits",
    "check_range",
    "check_text",
    "decode_image",
    "refused_input",
]


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (``GET /api/limits`` lists them).

    Example:
        >>> tight = Limits(max_chars=100, max_tokens=64)
        >>> tight.as_dict()["max_chars"], tight.max_steps  # the others keep their defaults
        (100, 64)
        >>> check_text(tight, "x" * 101)
        Traceback (most recent call last):
        ...
        attnlab.serve.limits.ApiError: text has 101 characters; the limit is max_chars=100
    """

    max_chars: int = 4000
    max_tokens: int = 512
    max_upload_bytes: int = 2_000_000
    max_image_side: int = 1024
    max_steps: int = 64
    max_top_k: int = 64
    max_flow_tokens: int = 64
    max_jobs: int = 32

    def __post_init__(self) -> None:
        plain_fields(self)  # (np.int64 was refused; /api/limits answers these as JSON)
        for name, value in asdict(self).items():  # (a str gave every request a 500)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{name} must be an int >= 1, got {value!r}")

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class ApiError(Exception):
    """An answer other than 200: ``status`` and a one-line ``detail``."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def check_text(limits: Limits, text: object, field: str = "text") -> str:
    """``text`` if it is a non-blank str within ``max_chars``; else ApiError 422 / 413."""
    if not isinstance(text, str):
        raise ApiError(422, f"{field} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ApiError(422, f"{field} is empty; give some text to look at")
    bad = _SURROGATE.search(text)
    if bad is not None:  # JSON's "\\udce9" escapes: no character, so not UTF-8 text
        seen = f"{ord(bad.group()):#06x}"
        raise ApiError(
            422, f"{field} holds an unpaired surrogate {seen} at character {bad.start()}"
        )
    if len(text) > limits.max_chars:
        raise ApiError(
            413, f"{field} has {len(text)} characters; the limit is max_chars={limits.max_chars}"
        )
    return text


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_range(field: str, value: int, low: int, high: int, limit: str = "") -> int:
    """``value`` if ``low <= value <= high``; else ApiError 422 naming the range."""
    if not low <= value <= high:
        where = f" ({limit})" if limit else ""
        raise ApiError(422, f"{field} must be in {low}..{high}{where}, got {value}")
    return value


@contextmanager
def refused_input() -> Iterator[None]:
    """A model's ``ValueError``/``TypeError`` about its input (a ``CheckpointError`` of a
    checkpoint that cannot be loaded is one too) as ApiError 422 with a one-line detail.

    Example:
        >>> try:
        ...     with refused_input():
        ...         raise ValueError("text must hold a date,\\n  e.g. '[en_US] 11/21/2026'")
        ... except ApiError as e:
        ...     print(e.status, e.detail)
        422 text must hold a date, e.g. '[en_US] 11/21/2026'
    """
    try:
        yield
    except (ValueError, TypeError) as e:
        raise ApiError(422, " ".join(str(e).split()) or type(e).__name__) from e


#: the formats an upload is decoded as: the API's (the page sends PNG); Pillow's others are
#: never tried (its EPS plugin ran Ghostscript on an uploaded PostScript file)
IMAGE_FORMATS = ("PNG", "JPEG")
_DATA_URL = re.compile(r"^data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)


def decode_image(limits: Limits, data: str) -> Any:
    """A ``data:image/...;base64,`` URL (or bare base64) -> a decoded PIL image.

    Pillow decodes it as one of :data:`IMAGE_FORMATS` only, with its decompression-bomb
    limit set to the largest image the limits allow; an image past ``max_upload_bytes``
    or ``max_image_side`` is a 413, one that is not a PNG or JPEG image a 422.
    """

    raw = _DATA_URL.sub("", data.strip(), count=1)
    if len(raw) > limits.max_upload_bytes * 4 // 3 + 4:
        raise ApiError(413, f"image is over max_upload_bytes={limits.max_upload_bytes}")
    try:
        blob = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(422, f"image must be a base64 data URL of a PNG or JPEG ({e})") from e
    if len(blob) > limits.max_upload_bytes:
        cap = limits.max_upload_bytes
        raise ApiError(413, f"image has {len(blob)} bytes; the limit is max_upload_bytes={cap}")
    return _open_image(limits, blob)


def _open_image(limits: Limits, blob: bytes) -> Any:
    from PIL import Image, UnidentifiedImageError

    side = limits.max_image_side
    default, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, side * side  # refused past 2x
    try:
        img = Image.open(io.BytesIO(blob), formats=IMAGE_FORMATS)
        if max(img.size) > side:
            raise ApiError(413, f"image is {img.size[0]}x{img.size[1]}; max_image_side={side}")
        img.load()
    except Image.DecompressionBombError as e:
        raise ApiError(413, f"image has too many pixels; max_image_side={side} ({e})") from e
    except UnidentifiedImageError as e:  # (Pillow's words held "<_io.BytesIO object at 0x..>")
        raise ApiError(
            422,
            f"image could not be decoded: its {len(blob)} bytes are not a whole "
            f"{' or '.join(IMAGE_FORMATS)} image (the formats accepted)",
        ) from e
    except (OSError, SyntaxError) as e:  # a known format, broken: "image file is truncated"
        raise ApiError(422, f"image could not be decoded ({len(blob)} bytes): {e}") from e
    finally:
        Image.MAX_IMAGE_PIXELS = default
    return img
