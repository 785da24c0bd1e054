"""A 60 Hz Pygame arena: send the player's state each frame, draw everyone's.

    python samples/pygame_arena.py [URL] [--frames N] [--headless] [--bots K] [--burst M]

What it shows: a real-time loop that calls blockws.update_all(max_time=...)
once per frame. The budget bounds the time callbacks may take from a frame
(2 ms here): when a flood arrives, the rest waits, in order, for the next
frames, and no frame is blown. Each entity is drawn where the network last
reported it, so what you see is what the server said.

Every frame the player's socket and each bot's socket (other players,
simulated in this process, each with its own socket) send their state as
JSON. Against a relay server that broadcasts, every socket hears the others;
without a URL, the sample starts blockws's embedded echo server (offline),
where each socket hears its own state back, and the arena draws what came
back. Move with the arrow keys. --burst M makes each bot send M messages a
frame, a flood to watch the budget at work. --headless runs without a window
(SDL's dummy drivers) and moves the player by itself; --frames N quits after
N frames. It prints what it exchanged, the time update_all() took per frame
and how far behind the drawn states were.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from typing import Any

import blockws
from blockws.server import EchoServer

FPS = 60
BUDGET = 0.002  # seconds of callbacks per frame
SIZE = (640, 480)
COLORS = [(240, 200, 60), (90, 170, 250), (250, 110, 110), (130, 230, 130), (200, 140, 250)]


class Arena:
    """The world as the network reported it: entity id -> latest state."""

    def __init__(self) -> None:
        self.world: dict[str, dict[str, Any]] = {}
        self.received = 0
        self.lags: list[float] = []  # seconds between a state's send and its arrival

    def on_message(self, ws: blockws.WebSocket, text: str) -> None:
        state = json.loads(text)  # inside update_all(), on the game's thread
        self.received += 1
        self.lags.append(time.perf_counter() - state["t"])
        self.world[state["id"]] = state


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * q))] if s else float("nan")


def run(url: str, frames: int | None, headless: bool, bots: int, burst: int) -> Arena:
    if headless:
        os.environ["SDL_VIDEODRIVER"] = "dummy"
        os.environ["SDL_AUDIODRIVER"] = "dummy"
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    import pygame

    pygame.display.init()
    screen = pygame.display.set_mode(SIZE)
    pygame.display.set_caption("blockws arena")
    clock = pygame.time.Clock()
    arena = Arena()
    names = ["player"] + [f"bot{i}" for i in range(bots)]
    sockets = {name: blockws.WebSocket(url, on_message=arena.on_message) for name in names}
    for ws in sockets.values():
        ws.open()
    player = [SIZE[0] / 2, SIZE[1] / 2]
    sent = 0
    frame = 0
    update_times: list[float] = []
    running = True
    while running and (frames is None or frame < frames):
        for event in pygame.event.get():
            if event.type == pygame.QUIT:
                running = False
        # 1. the network: every socket's callbacks, 2 ms of them at most.
        start = time.perf_counter()
        blockws.update_all(max_time=BUDGET)
        update_times.append(time.perf_counter() - start)
        # 2. the game: move, then tell the server.
        if headless:
            player[0] = SIZE[0] / 2 + 150 * math.cos(frame / 40)
            player[1] = SIZE[1] / 2 + 150 * math.sin(frame / 40)
        else:
            keys = pygame.key.get_pressed()
            player[0] += 4 * (keys[pygame.K_RIGHT] - keys[pygame.K_LEFT])
            player[1] += 4 * (keys[pygame.K_DOWN] - keys[pygame.K_UP])
        now = time.perf_counter()
        for i, (name, ws) in enumerate(sockets.items()):
            if not ws.is_open:
                continue
            if name == "player":
                x, y, count = player[0], player[1], 1
            else:
                angle = frame / (25 + 7 * i) + i
                x = SIZE[0] / 2 + (60 + 40 * i) * math.cos(angle)
                y = SIZE[1] / 2 + (60 + 40 * i) * math.sin(angle)
                count = burst
            for _ in range(count):
                ws.send(json.dumps({"id": name, "x": round(x, 1), "y": round(y, 1), "t": now}))
                sent += 1
        # 3. draw the world as the network last reported it.
        screen.fill((16, 18, 24))
        for i, (name, state) in enumerate(sorted(arena.world.items())):
            pos = (int(state["x"]), int(state["y"]))
            pygame.draw.circle(screen, COLORS[i % len(COLORS)], pos, 14 if name == "player" else 10)
        pygame.display.flip()
        frame += 1
        clock.tick(FPS)
    for ws in sockets.values():
        ws.close()
    for ws in sockets.values():
        ws.join(ws.close_timeout)
    blockws.update_all()  # the on_closed callbacks, if any
    pygame.quit()
    print(
        f"update_all(max_time={BUDGET}) per frame: p50 {pct(update_times, 0.5) * 1e3:.3f} ms, "
        f"p99 {pct(update_times, 0.99) * 1e3:.3f} ms, max {max(update_times) * 1e3:.3f} ms"
    )
    print(
        f"state lag: p50 {pct(arena.lags, 0.5) * 1e3:.2f} ms, "
        f"p99 {pct(arena.lags, 0.99) * 1e3:.2f} ms"
    )
    print(f"{len(arena.world)} entities drawn")
    print(f"{sent} sent, {arena.received} received in {frame} frames")
    return arena


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "url", nargs="?", help="a ws:// or wss:// URL (default: a local echo server)"
    )
    parser.add_argument(
        "--frames", type=int, help="quit after N frames (default: until closed; 300 when headless)"
    )
    parser.add_argument(
        "--headless", action="store_true", help="no window; the player moves by itself"
    )
    parser.add_argument(
        "--bots", type=int, default=3, help="other players, one socket each (default 3)"
    )
    parser.add_argument(
        "--burst", type=int, default=1, help="messages each bot sends a frame (default 1)"
    )
    args = parser.parse_args()
    if args.headless and args.frames is None:
        args.frames = 300  # nobody can close a window that is not there
    with contextlib.ExitStack() as stack:
        target = args.url or stack.enter_context(EchoServer()).url
        result = run(target, args.frames, args.headless, args.bots, args.burst)
    sys.exit(0 if result.received or not args.headless else 1)
