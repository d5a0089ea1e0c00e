"""attnlab's own warnings, taken by a block of this thread only, changed or dropped.

attnlab warns through :func:`warn`. A block takes the warnings attnlab raises inside it,
in its own thread (or asyncio task), as they come: :func:`passed_on` hands each to a
function, which passes it on with :func:`warn_again` (changed or not) or drops it, and
:func:`quiet` drops one category. ``attnlab ask`` says one truncation warning instead of
three with it, ``attnlab embed`` names ``TEXT 2`` instead of the encoder's ``texts[1]``.

Nothing here touches the process's warning filters or ``showwarning``: the
``warnings.catch_warnings`` blocks that did (before Python 3.14 they save and restore
both for the whole process) left, after two threads' ``ask`` calls, a finished block's
list as the place every later warning of the process went, and after two ``embed``
calls an ignore filter for the encoder's warning installed for good.

Example:
    >>> with passed_on(lambda w: print("held:", w.message)):
    ...     warn("cut")
    held: cut
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["passed_on", "quiet", "warn", "warn_again"]

Handler = Callable[[warnings.WarningMessage], None]
# this context's blocks, innermost last: contextvars, so each thread (and task) has its own
_HANDLERS: ContextVar[tuple[Handler, ...]] = ContextVar("attnlab_warning_handlers", default=())
_QUIET: ContextVar[tuple[type[Warning], ...]] = ContextVar("attnlab_quiet", default=())


def warn(
    message: str | Warning, category: type[Warning] = UserWarning, stacklevel: int = 1
) -> None:
    """:func:`warnings.warn` for attnlab's own warnings: the same call, unless a
    :func:`quiet` block of this thread drops its category or a :func:`passed_on` block
    of this thread takes it (blamed on the same line ``stacklevel`` frames up)."""
    if isinstance(message, Warning):
        category = type(message)
    if issubclass(category, _QUIET.get()):
        return
    if not _HANDLERS.get():
        warnings.warn(message, category, stacklevel=stacklevel + 1)
        return
    filename, lineno = _where(stacklevel)
    text = message if isinstance(message, Warning) else category(message)
    _deliver(warnings.WarningMessage(text, category, filename, lineno))


def _where(stacklevel: int) -> tuple[str, int]:
    """The file and line that :func:`warnings.warn` would blame if the caller of
    :func:`_where` called it with ``stacklevel`` (``("sys", 1)`` past the top of the
    stack)."""
    try:
        frame = sys._getframe(stacklevel + 1)
    except ValueError:
        return "sys", 1
    return frame.f_code.co_filename, frame.f_lineno


def _deliver(w: warnings.WarningMessage) -> None:
    """``w`` to the innermost block of this context (whose :func:`warn_again` goes to the
    next one out), or, with none, to Python's warnings from the module that warned."""
    handlers = _HANDLERS.get()
    if not handlers:
        module = _module_of(w.filename)
        if module is None:  # (module=None made Python say nothing: a doctest, python -c)
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        else:  # filters by module still match
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, module=module)
        return
    token = _HANDLERS.set(handlers[:-1])
    try:
        handlers[-1](w)
    finally:
        _HANDLERS.reset(token)


def _module_of(filename: str) -> str | None:
    """The name of the imported module whose file is ``filename``, if any."""
    files = ((n, getattr(m, "__file__", None)) for n, m in list(sys.modules.items()))
    return next((n for n, f in files if f == filename), None)


@contextmanager
def passed_on(handle: Handler) -> Iterator[None]:
    """Hand each warning that attnlab raises (:func:`warn`) in the block, in this thread,
    to ``handle`` as it comes, instead of warning it; ``handle`` passes it on with
    :func:`warn_again` or drops it. Other threads' warnings, and other libraries', pass
    as they would.

    Example:
        >>> with passed_on(lambda w: warn_again(w, f"{w.message}, said again")):
        ...     with warnings.catch_warnings(record=True) as caught:
        ...         warnings.simplefilter("always")
        ...         warn("held")
        >>> [str(w.message) for w in caught]
        ['held, said again']
    """
    token = _HANDLERS.set((*_HANDLERS.get(), handle))
    try:
        yield
    finally:
        _HANDLERS.reset(token)


@contextmanager
def quiet(category: type[Warning]) -> Iterator[None]:
    """Drop attnlab's warnings of ``category`` (:func:`warn`) raised in the block, in this
    thread only: the caller says them once itself.

    Example:
        >>> with quiet(UserWarning), passed_on(print):
        ...     warn("dropped")
    """
    token = _QUIET.set((*_QUIET.get(), category))
    try:
        yield
    finally:
        _QUIET.reset(token)


def warn_again(w: warnings.WarningMessage, message: Warning | str | None = None) -> None:
    """Warn ``w`` (or ``message`` in its place, of its own category if a Warning) again,
    from the module that first warned, so that filters by module still match; inside a
    :func:`passed_on` handler, to the block around that one."""
    text = w.message if message is None else message
    if isinstance(text, str):
        text = w.category(text)
    _deliver(warnings.WarningMessage(text, type(text), w.filename, w.lineno))
