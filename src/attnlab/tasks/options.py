"""The options that decide a task's data and loss, named in its checkpoints' config.

A resume must go on with the checkpoint's data and loss, and
:func:`~attnlab.train.checkpoint.check_same_run` refuses only what the config names: a
``DigitsTask(seed=1)`` resumed a seed-0 checkpoint and trained on 292 of the 360 images
that run held out for testing. Each task names them under ``config()["data"]``
(:class:`DataOptions`); a checkpoint saved before they were named means the defaults.
"""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["DataOptions"]


class DataOptions:
    """A task whose ``config()["data"]`` is :attr:`data_options`: each constructor argument
    that decides its data, its loss or its score (seed, held-out share, label smoothing,
    evaluation size), by name, as its ``__init__`` sets it.

    Example:
        >>> class T(DataOptions):
        ...     def __init__(self, seed: int = 3, d_model: int = 8) -> None:
        ...         self.data_options = {"seed": seed}
        >>> T(seed=5).data_options, T(seed=5).config_defaults()
        ({'seed': 5}, {'data': {'seed': 3}})
    """

    data_options: dict[str, Any]

    def config_defaults(self) -> dict[str, Any]:
        """What a checkpoint's config lacking an entry of ``data`` (saved before it was
        named) meant: the constructor's default, from the first class of the task's that
        declares the argument (a subclass may pass it on through ``**kwargs``)."""
        out: dict[str, Any] = {}
        for cls in type(self).__mro__:
            init = cls.__dict__.get("__init__")
            params = inspect.signature(init).parameters.values() if init is not None else ()
            for p in params:
                if p.name in self.data_options and p.default is not p.empty:
                    out.setdefault(p.name, p.default)
        return {"data": out}
