"""A plain game loop at 60 Hz that waits for its next frame in ws.wait().

    python samples/game_loop.py [URL] [--frames N] [--headless]

What it shows: callbacks run inside ws.update(), on the game's own thread, so
game state needs no locks; and the time left before the next frame is spent
in ws.wait() instead of time.sleep(): a message that arrives then is read
and parsed on this thread and handled at once (ws.update()), between frames,
so the reader thread stays out of the frames. Each frame calls
ws.update(max_time=0.002) first, a budget that keeps a flood of messages
from overrunning a frame (what is left waits, in order, for the next).

Without a URL it starts blockws's embedded echo server, so it runs offline.
It has no window; --headless is accepted so that every sample takes the same
flags. It ends after N frames (default 180) and prints what it exchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import blockws
from blockws.server import EchoServer

FRAME = 1 / 60
BUDGET = 0.002  # seconds of callbacks per frame, at most (about)


class Game:
    def __init__(self) -> None:
        self.position = [0.0, 0.0]
        self.sent = 0
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


def run(url: str, frames: int) -> Game:
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
    next_frame = time.perf_counter()
    for frame in range(frames):
        if not game.running:
            break
        ws.update(max_time=BUDGET)  # the callbacks pending; cheap when none are
        game.position[0] += 1.0 * FRAME
        if ws.is_open and frame % 10 == 0:
            ws.send(json.dumps({"frame": frame, "pos": [round(v, 3) for v in game.position]}))
            game.sent += 1
        # ... render here ...
        next_frame += FRAME
        # Wait for the next frame in the socket: this thread reads what comes
        # meanwhile, and its callbacks run now rather than next frame.
        while True:
            left = next_frame - time.perf_counter()
            if left <= 0:
                break
            if ws.wait(left):
                ws.update(max_time=BUDGET)
    ws.close(1000, "game over")
    ws.join(ws.close_timeout)
    ws.update()  # runs on_closed
    print(f"{game.sent} sent, {game.echoes} received in {frames} frames")
    return game


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "url", nargs="?", help="a ws:// or wss:// URL (default: a local echo server)"
    )
    parser.add_argument("--frames", type=int, default=180, help="frames to run (default 180)")
    parser.add_argument("--headless", action="store_true", help="no window (this sample has none)")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        target = args.url or stack.enter_context(EchoServer()).url
        run(target, args.frames)
