"""A Panda3D app that shows the messages it receives in an OnscreenText.

    python samples/panda3d_ticker.py [URL] [--frames N] [--headless]

What it shows: blockws.integrations.panda3d.attach() adds a task that runs
blockws.update_all() once per frame (here with a 2 ms budget), so every
callback runs on Panda3D's main thread, inside the frame, and may touch the
scene graph: on_message sets the text of an OnscreenText. The task removes
itself once every socket has closed.

A second task sends a "tick" every quarter of a second. Without a URL it
starts blockws's embedded echo server, so it runs offline and the ticks come
back. --headless runs without a window (window-type none, no audio);
--frames N steps N frames (at 60 Hz) and quits; without it, base.run() runs
until the window is closed. It prints what it exchanged and the text shown.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import Any

import blockws
from blockws.server import EchoServer

FRAME = 1 / 60
TICK = 0.25  # seconds between ticks


class Ticker:
    def __init__(self, text: Any) -> None:
        self.text = text  # the OnscreenText
        self.lines: list[str] = []
        self.sent = 0
        self.received = 0
        self.next_tick = 0.0

    # Callbacks: inside update_all(), in the task, on Panda3D's main thread.
    def on_open(self, ws: blockws.WebSocket) -> None:
        self.show(f"connected to {ws.url}")

    def on_message(self, ws: blockws.WebSocket, text: str) -> None:
        self.received += 1
        self.show(f"< {text}")

    def on_closed(self, ws: blockws.WebSocket, code: int, reason: str) -> None:
        self.show(f"disconnected: {code}")

    def show(self, line: str) -> None:
        self.lines = (self.lines + [line])[-6:]
        self.text.setText("\n".join(self.lines))

    def tick_task(self, ws: blockws.WebSocket) -> Any:
        def tick(task: Any) -> Any:
            if ws.is_open and task.time >= self.next_tick:
                self.next_tick = task.time + TICK
                self.sent += 1
                ws.send(f"tick {self.sent} at {time.strftime('%H:%M:%S')}")
            return task.cont

        return tick


def run(url: str, frames: int | None, headless: bool) -> Ticker:
    from panda3d.core import loadPrcFileData

    if headless:
        loadPrcFileData(
            "", "window-type none\naudio-library-name null\nnotify-level-device fatal\n"
        )
    from direct.gui.OnscreenText import OnscreenText
    from direct.showbase.ShowBase import ShowBase

    from blockws.integrations import panda3d as bw_panda3d

    base = ShowBase()
    text = OnscreenText(text="connecting...", pos=(-1.2, 0.8), scale=0.06, align=0, mayChange=True)
    ticker = Ticker(text)
    ws = blockws.WebSocket(
        url, on_open=ticker.on_open, on_message=ticker.on_message, on_closed=ticker.on_closed
    )
    ws.open()
    bw_panda3d.attach(base.taskMgr, max_time=0.002)  # update_all() every frame
    base.taskMgr.add(ticker.tick_task(ws), "ticker")
    if frames is None:
        base.run()  # until the window closes (sys.exit)
    else:
        next_frame = time.perf_counter()
        for _ in range(frames):
            base.taskMgr.step()
            next_frame += FRAME
            # Pace at 60 Hz; wait in the socket, so a message is read meanwhile.
            left = next_frame - time.perf_counter()
            if left > 0:
                ws.wait(left)
    ws.close()
    deadline = time.monotonic() + (ws.close_timeout or 5.0) + 1.0
    while base.taskMgr.hasTaskNamed(bw_panda3d.TASK_NAME) and time.monotonic() < deadline:
        ws.wait(FRAME)
        base.taskMgr.step()  # on_closed runs in the task, which then removes itself
    print("shown:", " | ".join(ticker.lines))
    print(f"{ticker.sent} sent, {ticker.received} received in {frames} frames")
    base.destroy()
    return ticker


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "url", nargs="?", help="a ws:// or wss:// URL (default: a local echo server)"
    )
    parser.add_argument(
        "--frames", type=int, help="step N frames and quit (default: base.run(); 300 when headless)"
    )
    parser.add_argument("--headless", action="store_true", help="no window, no audio")
    args = parser.parse_args()
    if args.headless and args.frames is None:
        args.frames = 300  # nobody can close a window that is not there
    with contextlib.ExitStack() as stack:
        target = args.url or stack.enter_context(EchoServer()).url
        result = run(target, args.frames, args.headless)
    sys.exit(0 if result.received or not args.headless else 1)
