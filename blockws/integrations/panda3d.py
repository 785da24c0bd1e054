"""Panda3D: a task that pumps every socket once per frame.

::

    from direct.showbase.ShowBase import ShowBase
    import blockws
    from blockws.integrations import panda3d as bw_panda3d

    base = ShowBase()
    ws = blockws.WebSocket(url, on_message=show)
    ws.open()
    bw_panda3d.attach(max_time=0.002)   # update_all() each frame, 2 ms at most
    base.run()

:func:`attach` adds a task (named ``"blockws-update"``) to the task manager
that runs :func:`blockws.update_all` once per frame, with the budget given,
so every callback runs on Panda3D's main thread, inside the frame, before
the default tasks (``sort`` -10: after input at -50, before game tasks at 0
and rendering at 50). Callbacks a budget leaves pending run on the next
frames, in order. The task removes itself once every socket it has seen has
closed and its ``on_closed`` has run (a program that opens sockets later
attaches again); :func:`detach` removes it at once.

Threads: the task runs on the thread that steps the task manager; attach and
detach from that thread too. Importing this module does not import Panda3D;
:func:`attach` does.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..dispatcher import Budget, live_count, update_all

__all__ = ["attach", "detach", "DEFAULT_SORT", "TASK_NAME"]

#: After Panda3D's input tasks (dataLoop, -50), before default tasks (0) and igLoop (50).
DEFAULT_SORT = -10
TASK_NAME = "blockws-update"

# The task manager, the attached task and its function, or None.
_attached: tuple[Any, Any, _Pump] | None = None


class _Pump:
    """The task function: ``update_all()`` with the budget; done once every socket closed."""

    def __init__(self, max_callbacks: int | None, max_time: float | None) -> None:
        self.max_callbacks = max_callbacks
        self.max_time = max_time
        self.seen_sockets = False
        #: Callbacks run by the task, over its life.
        self.callbacks = 0

    def __call__(self, task: Any) -> Any:
        if live_count():
            self.seen_sockets = True
        self.callbacks += update_all(self.max_callbacks, self.max_time)
        if self.seen_sockets and not live_count():
            _forget(self)
            return task.done
        return task.cont


def _forget(pump: _Pump) -> None:
    # Found by the pump, not by the task: Panda3D hands the task function a new
    # Python object for the same task each time (``task is added`` is False).
    global _attached
    if _attached is not None and _attached[2] is pump:
        _attached = None


def attach(
    task_mgr: Any = None,
    sort: int = DEFAULT_SORT,
    *,
    max_callbacks: int | None = None,
    max_time: float | None = None,
) -> Any:
    """Add the task that runs :func:`blockws.update_all` each frame; returns it.

    ``task_mgr`` defaults to Panda3D's global ``taskMgr`` (``base.taskMgr``).
    ``max_callbacks`` and ``max_time`` (seconds) are the per-frame budget of
    :func:`blockws.update_all`. Attaching again replaces the task. Raises
    ``TypeError``/``ValueError`` for a wrong budget, ``ImportError`` when
    Panda3D is not installed.
    """
    global _attached
    Budget.of(max_callbacks, max_time)  # wrong values fail here, not in a frame
    if type(sort) is bool or not isinstance(sort, int):
        raise TypeError(f"sort must be an int, not {type(sort).__name__}")
    if task_mgr is None:
        task_mgr = importlib.import_module("direct.task.TaskManagerGlobal").taskMgr
    detach()
    pump = _Pump(max_callbacks, max_time)
    task = task_mgr.add(pump, TASK_NAME, sort=sort)
    _attached = (task_mgr, task, pump)
    return task


def detach() -> None:
    """Remove the task :func:`attach` added; a no-op when there is none."""
    global _attached
    attached, _attached = _attached, None
    if attached is not None:
        task_mgr, task, _pump = attached
        task_mgr.remove(task)
