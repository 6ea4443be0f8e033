"""`TASKS`: the exact-name registry of evaluation tasks (name -> zero-argument factory of a `Task`).

    easyvqa                      EasyVQATask (tasks/easyvqa.py)
    world-colour ... world-report-complex   WorldTask(name) (tasks/world.py), one per `EVAL_TASKS` name

Registration is explicit, here (no directory scan). Tests may add their own tasks under new names.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

from ...data.world import EVAL_TASKS
from ...registry import Registry
from .. import Task
from .easyvqa import EasyVQATask
from .world import WorldTask

TASKS: Registry[Callable[[], Task]] = Registry("eval task")
TASKS.add("easyvqa", EasyVQATask)
for _name in EVAL_TASKS:
    TASKS.add(_name, partial(WorldTask, _name))

__all__ = ["TASKS", "EasyVQATask", "WorldTask"]
