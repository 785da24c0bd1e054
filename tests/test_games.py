"""Games: the Pygame and Panda3D integrations and budgets, over real sockets.

Against blockws's embedded echo server (``blockws.server.EchoServer``) on
127.0.0.1. Pygame runs with SDL's dummy video and audio drivers; Panda3D's
task manager is stepped by hand (``taskMgr.step()``), with no window.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import blockws
from blockws.server import EchoServer

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
WAIT = 10.0


def need(module: str) -> Any:
    """Import an engine; a missing one skips the test, except in CI, which installs
    the ``games`` extra (.ci/run): there it fails, so a lost install step shows."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


@pytest.fixture(scope="module")
def echo_url() -> Iterator[str]:
    with EchoServer() as server:
        yield server.url


@pytest.fixture(autouse=True)
def no_global_hook() -> Iterator[None]:
    yield
    blockws.set_on_pending(None)


def close(ws: blockws.WebSocket) -> None:
    ws.close()
    assert ws.join(WAIT)
    ws.update()


def test_integrations_import_no_engine() -> None:
    code = (
        "import sys, blockws.integrations.pygame, blockws.integrations.panda3d;"
        "print(sorted(m for m in ('pygame', 'panda3d', 'direct') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
    )
    assert out.stdout.strip() == "[]"


# -- budgets over a real socket ----------------------------------------------------------


def test_a_flood_stays_pending_in_order_under_a_budget_and_is_all_delivered(
    echo_url: str,
) -> None:
    """Frames of a loop with ``update(max_time=...)`` stay short while a flood
    is pending; everything arrives later, in order."""
    seen: list[int] = []
    slow = 0.0002  # each callback costs 0.2 ms of the frame

    def on_message(_: Any, text: str) -> None:
        seen.append(int(text))
        end = time.perf_counter() + slow
        while time.perf_counter() < end:
            pass

    ws = blockws.connect(echo_url, timeout=WAIT, on_message=on_message, extensions=[])
    total = 3000
    for i in range(total):
        ws.send(str(i))
    # Let every echo arrive before the first frame: all of it is pending now.
    deadline = time.monotonic() + WAIT
    while ws.bytes_received < total * 2 + sum(len(str(i)) for i in range(total)):
        assert time.monotonic() < deadline, "echoes did not arrive"
        ws.wait(0.05)
    frames: list[tuple[int, float]] = []
    while len(seen) < total:
        start = time.perf_counter()
        ran = ws.update(max_time=0.002)
        frames.append((ran, time.perf_counter() - start))
        assert len(frames) < 10_000
    assert seen == list(range(total))
    assert len(frames) > 5, "a budget of 2 ms cannot hold 3000 callbacks of 0.2 ms"
    assert max(ran for ran, _ in frames[:-1]) < total
    # Over budget by about one callback, not by the flood (generous: shared CPU).
    took = sorted(t for _, t in frames)
    assert took[len(took) // 2] < 0.010, took
    close(ws)


def test_update_all_budget_over_several_sockets(echo_url: str) -> None:
    seen: dict[int, list[int]] = {}
    sockets = []
    for k in range(4):
        seen[k] = []
        ws = blockws.connect(
            echo_url, timeout=WAIT, on_message=lambda _, t, k=k: seen[k].append(int(t))
        )
        sockets.append(ws)
    for ws in sockets:
        for i in range(200):
            ws.send(str(i))
    calls = 0
    deadline = time.monotonic() + WAIT
    while any(len(v) < 200 for v in seen.values()):
        assert time.monotonic() < deadline
        blockws.wait(0.05)
        assert blockws.update_all(max_callbacks=50) <= 50
        calls += 1
    assert calls >= 16  # 800 callbacks, at most 50 a call
    assert all(v == list(range(200)) for v in seen.values())
    for ws in sockets:
        close(ws)


# -- Pygame ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pygame() -> Iterator[Any]:
    os.environ["SDL_VIDEODRIVER"] = "dummy"
    os.environ["SDL_AUDIODRIVER"] = "dummy"
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    pg = need("pygame")
    pg.display.init()
    pg.display.set_mode((64, 64))
    yield pg
    pg.display.quit()


def test_a_loop_sleeping_in_pygame_event_wait_wakes_for_a_message(
    pygame: Any, echo_url: str
) -> None:
    """The loop sleeps in ``pygame.event.wait()``; a message wakes it, promptly."""
    from blockws.integrations import pygame as bw_pygame

    received: list[tuple[str, float]] = []
    ws = blockws.connect(
        echo_url,
        timeout=WAIT,
        on_message=lambda _, t: received.append((t, time.perf_counter())),
        extensions=[],
    )
    network = bw_pygame.attach(ws)
    assert network >= pygame.USEREVENT
    poster = ws.on_pending
    announced: list[float] = []

    def stamp_then_post(sock: blockws.WebSocket) -> None:
        announced.append(time.perf_counter())
        assert poster is not None
        poster(sock)

    ws.on_pending = stamp_then_post
    pygame.event.clear()
    wake: list[float] = []  # hook called -> the callback ran on this thread
    rounds = 20
    for i in range(rounds):
        # Another thread sends after a pause, while this loop sleeps in wait().
        timer = threading.Timer(0.01, ws.send, args=(f"hello {i}",))
        timer.start()
        while len(received) <= i:
            event = pygame.event.wait(int(WAIT * 1000))
            assert event.type != pygame.NOEVENT, "no event: the loop was never woken"
            if event.type == network:
                assert event.ws is ws
                ws.update()
        timer.join()
        wake.append(received[i][1] - announced[-1])
    assert [t for t, _ in received] == [f"hello {i}" for i in range(rounds)]
    wake.sort()
    p50, worst = wake[len(wake) // 2], wake[-1]
    print(f"pygame wake: hook -> callback p50 {p50 * 1e6:.0f} us, max {worst * 1e6:.0f} us")
    # The target is 0.2 ms; the bound here is generous for a shared CPU.
    assert p50 < 0.020, wake
    bw_pygame.detach(ws)
    assert ws.on_pending is None
    close(ws)


def test_pygame_events_are_coalesced(pygame: Any, echo_url: str) -> None:
    """However many wake-ups, at most one event of the type waits in the queue."""
    from blockws.integrations import pygame as bw_pygame

    got: list[str] = []
    ws = blockws.connect(echo_url, timeout=WAIT, on_message=lambda _, t: got.append(t))
    network = bw_pygame.attach(ws)
    pygame.event.clear()
    for i in range(5):
        ws.send(f"m{i}")
        assert ws.wait(WAIT)  # the echo is pending: the hook has posted
        deadline = time.monotonic() + WAIT
        while not pygame.event.peek(network):
            assert time.monotonic() < deadline
            time.sleep(0.001)
        ws.update()  # drained without taking the event: the next one re-arms the hook
    assert got == [f"m{i}" for i in range(5)]
    assert len(pygame.event.get(network)) == 1
    close(ws)


def test_pygame_attach_for_every_socket(pygame: Any, echo_url: str) -> None:
    from blockws.integrations import pygame as bw_pygame

    network = bw_pygame.attach(event_type=pygame.USEREVENT + 5)
    assert network == pygame.USEREVENT + 5
    got: list[str] = []
    pygame.event.clear()
    a = blockws.WebSocket(echo_url, on_message=lambda _, t: got.append("a" + t))
    b = blockws.WebSocket(echo_url, on_message=lambda _, t: got.append("b" + t))
    a.open()
    b.open()
    deadline = time.monotonic() + WAIT
    sent = False
    while not sent or len(got) < 2:
        assert time.monotonic() < deadline, got
        event = pygame.event.wait(int(WAIT * 1000))
        if event.type == network:
            blockws.update_all()
            # Once: a second wake-up can come before the first echo (sending
            # while ``got`` was empty sent twice then).
            if a.is_open and b.is_open and not sent:
                a.send("1")
                b.send("2")
                sent = True
    assert sorted(got) == ["a1", "b2"]
    with pytest.raises(TypeError):
        bw_pygame.attach(a, event_type="x")  # type: ignore[arg-type]
    bw_pygame.detach()
    close(a)
    close(b)


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


def test_panda3d_task_pumps_every_socket_and_removes_itself(task_mgr: Any, echo_url: str) -> None:
    from blockws.integrations import panda3d as bw_panda3d

    got: list[str] = []
    closed: list[int] = []
    thread = threading.get_ident()
    threads: set[int] = set()

    def on_message(_: Any, text: str) -> None:
        got.append(text)
        threads.add(threading.get_ident())

    ws = blockws.WebSocket(
        echo_url, on_message=on_message, on_closed=lambda _, code, __: closed.append(code)
    )
    task = bw_panda3d.attach(task_mgr, max_callbacks=2)
    assert task_mgr.hasTaskNamed(bw_panda3d.TASK_NAME)
    task_mgr.step()  # no socket yet: the task stays
    assert task_mgr.hasTaskNamed(bw_panda3d.TASK_NAME)
    ws.open()
    deadline = time.monotonic() + WAIT
    while not ws.is_open:
        assert time.monotonic() < deadline
        ws.wait(0.05)
        task_mgr.step()
    for i in range(6):
        ws.send(str(i))
    steps = 0
    while len(got) < 6:
        assert time.monotonic() < deadline
        before = len(got)
        ws.wait(0.05)
        task_mgr.step()
        assert len(got) - before <= 2  # the budget holds per frame
        steps += 1
    assert got == [str(i) for i in range(6)] and threads == {thread}
    assert steps >= 3
    ws.close()
    while not closed:
        assert time.monotonic() < deadline
        ws.wait(0.05)
        task_mgr.step()
    assert closed == [1000]
    task_mgr.step()
    assert not task_mgr.hasTaskNamed(bw_panda3d.TASK_NAME)  # every socket closed
    assert task is not None


def test_panda3d_detach_removes_the_task(task_mgr: Any) -> None:
    from blockws.integrations import panda3d as bw_panda3d

    bw_panda3d.attach(task_mgr, sort=5)
    assert task_mgr.hasTaskNamed(bw_panda3d.TASK_NAME)
    bw_panda3d.attach(task_mgr)  # again: replaces, never two
    assert len(task_mgr.getTasksNamed(bw_panda3d.TASK_NAME)) == 1
    bw_panda3d.detach()
    assert not task_mgr.hasTaskNamed(bw_panda3d.TASK_NAME)
    bw_panda3d.detach()  # a no-op
    with pytest.raises(ValueError):
        bw_panda3d.attach(task_mgr, max_time=-1)
    assert not task_mgr.hasTaskNamed(bw_panda3d.TASK_NAME)
