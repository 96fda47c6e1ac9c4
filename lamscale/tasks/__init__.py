"""Tasks, registered by name (`task.name`): one module each, a `Task` subclass decorated with `@register`."""
from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lamscale.config import Config
    from lamscale.tasks.base import Task

TASKS: dict[str, type] = {}
_discovered = False


def register(cls: type) -> type:
    TASKS[cls.name] = cls
    return cls


def task_names() -> list[str]:
    """Every registered task; the first call imports each module of this package once."""
    global _discovered
    if not _discovered:
        for module in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{module.name}")
        _discovered = True
    return sorted(TASKS)


def get_task(cfg: Config) -> Task:
    """The task `cfg.task.name` names, built over `cfg`."""
    if cfg.task.name not in task_names():
        raise ValueError(f"task.name: unknown task {cfg.task.name!r}; expected one of {task_names()}")
    return TASKS[cfg.task.name](cfg)
