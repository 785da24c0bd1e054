"""The Pygame and Panda3D integrations: what tests/test_games.py leaves out.

The hook's and the task's bookkeeping (a task that removed itself, attaching again from a
callback, the global task manager), and the argument checks. Sockets talk to blockws's
embedded echo server on 127.0.0.1; Pygame runs with SDL's dummy drivers, Panda3D's task
manager is stepped by hand, with no window.
"""

from __future__ import annotations

import gc
import importlib
import os
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

import blockws
from blockws.server import EchoServer

pytestmark = pytest.mark.timeout(30)

WAIT = 10.0


def need(module: str) -> Any:
    """Import an engine; missing, it skips the test (fails in CI, which installs it)."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


@pytest.fixture(scope="module")
def echo_url() -> Iterator[str]:
    with EchoServer() as server:
        yield server.url


# -- Pygame ------------------------------------------------------------------------------


@pytest.fixture
def pygame() -> Any:
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    return need("pygame")


@pytest.mark.unit
def test_pygame_hook_says_what_it_is(pygame: Any) -> None:
    """The hook attach() sets shows its event type (what a debugger or a log prints)."""
    from blockws.integrations import pygame as bw_pygame

    ws = blockws.WebSocket("ws://127.0.0.1:9/")
    network = bw_pygame.attach(ws, event_type=pygame.USEREVENT + 7)
    assert network == pygame.USEREVENT + 7
    assert repr(ws.on_pending) == (
        f"<blockws.integrations.pygame hook for event type {pygame.USEREVENT + 7}>"
    )
    bw_pygame.detach(ws)
    assert ws.on_pending is None


@pytest.mark.unit
def test_pygame_attach_checks_its_arguments() -> None:
    """Wrong arguments fail before pygame is even imported."""
    from blockws.integrations import pygame as bw_pygame

    with pytest.raises(TypeError, match=r"takes a blockws.WebSocket or None, not str"):
        bw_pygame.attach("ws://127.0.0.1/")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"event_type must be an int, not bool"):
        bw_pygame.attach(event_type=True)


# -- Panda3D -----------------------------------------------------------------------------


@pytest.fixture
def task_mgr() -> Iterator[Any]:
    need("panda3d")
    from direct.task.Task import TaskManager

    mgr = TaskManager()
    yield mgr
    from blockws.integrations import panda3d as bw_panda3d

    bw_panda3d.detach()
    mgr.destroy()


def step_until(task_mgr: Any, ws: blockws.WebSocket, done: Any) -> None:
    deadline = time.monotonic() + WAIT
    while not done():
        assert time.monotonic() < deadline, "timed out stepping the task manager"
        ws.wait(0.05)
        task_mgr.step()


@pytest.mark.unit
def test_panda3d_attach_checks_sort() -> None:
    from blockws.integrations import panda3d as bw_panda3d

    with pytest.raises(TypeError, match=r"sort must be an int, not bool"):
        bw_panda3d.attach(object(), sort=True)
    with pytest.raises(TypeError, match=r"sort must be an int, not str"):
        bw_panda3d.attach(object(), sort="-10")  # type: ignore[arg-type]


def test_panda3d_attach_defaults_to_the_global_task_manager() -> None:
    need("panda3d")
    from direct.task.TaskManagerGlobal import taskMgr

    from blockws.integrations import panda3d as bw_panda3d

    try:
        task = bw_panda3d.attach(max_time=0.002)
        assert taskMgr.hasTaskNamed(bw_panda3d.TASK_NAME)
        assert task.getSort() == bw_panda3d.DEFAULT_SORT
    finally:
        bw_panda3d.detach()
    assert not taskMgr.hasTaskNamed(bw_panda3d.TASK_NAME)


def test_panda3d_task_that_removed_itself_lets_go_of_its_manager(echo_url: str) -> None:
    """Regression: once the task removed itself (every socket closed), blockws still held
    the task manager, as the attached one, for good (the task function is handed a new
    Python object for the task each frame, so the identity check never matched): a
    destroyed manager was never freed, and detach() "removed" the dead task again."""
    need("panda3d")
    from direct.task.Task import TaskManager

    from blockws.integrations import panda3d as bw_panda3d

    mgr = TaskManager()
    closed: list[int] = []
    ws = blockws.WebSocket(echo_url, on_closed=lambda _, code, __: closed.append(code))
    bw_panda3d.attach(mgr)
    ws.open()
    step_until(mgr, ws, lambda: ws.is_open)
    ws.close()
    step_until(mgr, ws, lambda: bool(closed))
    mgr.step()
    assert closed == [1000]
    assert not mgr.hasTaskNamed(bw_panda3d.TASK_NAME)  # it removed itself
    gone = weakref.ref(mgr)
    mgr.destroy()
    del mgr
    gc.collect()
    assert gone() is None, "blockws still holds the task manager after its task ended"


def test_panda3d_attach_again_from_on_closed(task_mgr: Any, echo_url: str) -> None:
    """A callback that attaches again (before its own task ends) keeps the new task: the
    old task, finishing, forgets only itself, and detach() then removes the new one."""
    from blockws.integrations import panda3d as bw_panda3d

    tasks: list[Any] = []

    def on_closed(_: Any, code: int, __: str) -> None:
        tasks.append(bw_panda3d.attach(task_mgr, sort=3))

    ws = blockws.WebSocket(echo_url, on_closed=on_closed)
    tasks.append(bw_panda3d.attach(task_mgr))
    ws.open()
    step_until(task_mgr, ws, lambda: ws.is_open)
    ws.close()
    step_until(task_mgr, ws, lambda: len(tasks) == 2)
    task_mgr.step()
    task_mgr.step()
    # The first task is gone; the one attached from on_closed runs on.
    named = task_mgr.getTasksNamed(bw_panda3d.TASK_NAME)
    assert [t.getSort() for t in named] == [3]
    bw_panda3d.detach()
    assert not task_mgr.hasTaskNamed(bw_panda3d.TASK_NAME)
