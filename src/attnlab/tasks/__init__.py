"""Tasks with data generated offline from real-language libraries (no downloads).

Each task is a module named after it (``attnlab.tasks.translation``, ``.dates``,
``.generation``, ``.vision``, ``.captioning``, ``.classification``) that defines its data,
its training task and a ``SPEC`` (:class:`TaskSpec`); the functions below train one the
way ``attnlab train`` and ``attnlab demo`` do.

Example:
    >>> from attnlab.tasks import TASKS, spec, train_config
    >>> sorted(TASKS)[-1], train_config(spec("vision"), steps=5).steps
    ('vision', 5)
"""

from __future__ import annotations

from attnlab.tasks.registry import TASKS, TaskSpec, spec
from attnlab.tasks.run import demo, run_task, train_config

__all__ = ["TASKS", "TaskSpec", "demo", "run_task", "spec", "train_config"]
