"""A plain game loop at 60 Hz that calls ws.update() once per frame.

    python samples/game_loop.py [URL] [--frames N]

The network runs on blockws's background threads; callbacks run inside
ws.update(), on the game's own thread, so game state needs no locks.
Without a URL it starts blockws's embedded echo server, so it runs offline.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import blockws
from blockws.server import EchoServer

FRAME = 1 / 60


class Game:
    def __init__(self) -> None:
        self.position = [0.0, 0.0]
        self.echoes = 0
        self.running = True

    def on_open(self, ws: blockws.WebSocket) -> None:
        print("connected; sending our position every 10 frames")

    def on_message(self, ws: blockws.WebSocket, text: str) -> None:
        self.echoes += 1  # runs on the game thread, inside ws.update()
        state = json.loads(text)
        if self.echoes % 6 == 0:
            print(f"server saw us at {state['pos']} (latency {ws.latency or 0:.4f} s)")

    def on_closed(self, ws: blockws.WebSocket, code: int, reason: str) -> None:
        print(f"disconnected: {code} {reason!r} error={ws.error!r}")
        self.running = False


def run(url: str, frames: int) -> None:
    game = Game()
    ws = blockws.WebSocket(
        url,
        on_open=game.on_open,
        on_message=game.on_message,
        on_closed=game.on_closed,
        send_pings=True,
        ping_frequency=0.5,
    )
    ws.open()  # returns at once
    next_frame = time.monotonic()
    for frame in range(frames):
        if not game.running:
            break
        ws.update()  # run the callbacks that are pending; cheap when none are
        game.position[0] += 1.0 * FRAME
        if ws.is_open and frame % 10 == 0:
            ws.send(json.dumps({"frame": frame, "pos": [round(v, 3) for v in game.position]}))
        next_frame += FRAME
        time.sleep(max(0.0, next_frame - time.monotonic()))
    ws.close(1000, "game over")
    ws.join(ws.close_timeout)
    ws.update()  # runs on_closed
    print(f"{game.echoes} echoes in {frames} frames")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("url", nargs="?")
    parser.add_argument("--frames", type=int, default=180)
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        target = args.url or stack.enter_context(EchoServer()).url
        run(target, args.frames)
