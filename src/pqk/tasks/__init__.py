"""Model families pqk measures, each one task adapter (`pqk.tasks.base.Task`).

    >>> from pqk.tasks import get_task
    >>> task = get_task("dust3r")
    >>> task.main_metric, task.quality_fields
    ('delta1', ('chamfer', 'absrel', 'rmse', 'delta1'))

A family registers its adapter here (or calls `register_task`); plans name it with
`task: <name>` and default to DUSt3R.
"""

from __future__ import annotations

from importlib import import_module

from pqk.errors import ConfigError
from pqk.tasks.base import Measurement, Task

DEFAULT_TASK = "dust3r"
# Built-in families, imported on first use (a family's modules are not loaded unless asked for).
_BUILTIN = {"dust3r": "pqk.tasks.dust3r"}
_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Make `task` available to plans and commands by its name."""
    _TASKS[task.name] = task
    return task


def task_names() -> list[str]:
    return sorted({*_BUILTIN, *_TASKS})


def get_task(name: str | None = None) -> Task:
    """The adapter of family `name` (default: DUSt3R); one-line error for an unknown one."""
    name = name or DEFAULT_TASK
    if name not in _TASKS:
        if name not in _BUILTIN:
            raise ConfigError(f"unknown task {name!r}; accepted: {', '.join(task_names())}")
        register_task(import_module(_BUILTIN[name]).TASK)
    return _TASKS[name]


__all__ = ["DEFAULT_TASK", "Measurement", "Task", "get_task", "register_task", "task_names"]
