"""An event-driven Pygame chat window that sleeps in pygame.event.wait().

    python samples/pygame_chat.py [URL] [--frames N] [--headless]

What it shows: a program that has nothing to do between events (a chat, a
menu, a turn-based game) need not poll the network every frame.
blockws.integrations.pygame.attach(ws) makes blockws post a pygame event when
the socket has callbacks pending, so the loop sleeps in pygame.event.wait(),
spends no CPU while idle, and wakes within a fraction of a millisecond when a
message arrives; it then calls ws.update(), which runs on_message on this
thread. Events are coalesced: a flood of messages posts one event.

Type a line and press Enter to send it; what the server sends back is shown.
Without a URL it starts blockws's embedded echo server, so it runs offline
and your lines come back. --headless runs without a window (SDL's dummy
drivers) and types lines by itself, as key events; --frames N quits after N
redraws (one per event handled). It prints what it exchanged, and the round
trip of each line.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Any

import blockws
from blockws.server import EchoServer

SIZE = (520, 360)
LINES = 14


class Chat:
    def __init__(self, pygame: Any, headless: bool) -> None:
        self.pg = pygame
        self.headless = headless
        self.lines: list[str] = ["connecting..."]
        self.typing = ""
        self.sent = 0
        self.received = 0
        self.sent_at: dict[str, float] = {}
        self.round_trips: list[float] = []
        self.open = False
        self.closed = False

    # -- the socket's callbacks: inside ws.update(), on the loop's thread ---------------

    def on_open(self, ws: blockws.WebSocket) -> None:
        self.open = True
        self.lines.append(f"connected to {ws.url}")
        if self.headless:
            self.type_line()

    def on_message(self, ws: blockws.WebSocket, text: str) -> None:
        self.received += 1
        sent = self.sent_at.pop(text, None)
        if sent is not None:
            self.round_trips.append(time.perf_counter() - sent)
        self.lines.append(f"< {text}")
        if self.headless:
            self.type_line()

    def on_closed(self, ws: blockws.WebSocket, code: int, reason: str) -> None:
        self.open = False
        self.closed = True
        self.lines.append(f"disconnected: {code} {reason!r}")

    # -- input ------------------------------------------------------------------------

    def type_line(self) -> None:
        """Headless: type the next line as a user would, as key events."""
        pg = self.pg
        for ch in f"hello {self.sent + 1}":
            pg.event.post(pg.event.Event(pg.KEYDOWN, key=ord(ch), unicode=ch, mod=0, scancode=0))
        pg.event.post(pg.event.Event(pg.KEYDOWN, key=pg.K_RETURN, unicode="\r", mod=0, scancode=0))

    def key(self, ws: blockws.WebSocket, event: Any) -> None:
        pg = self.pg
        if event.key == pg.K_RETURN:
            if self.typing and self.open:
                self.sent_at[self.typing] = time.perf_counter()
                ws.send(self.typing)  # never blocks
                self.sent += 1
                self.lines.append(f"> {self.typing}")
            self.typing = ""
        elif event.key == pg.K_BACKSPACE:
            self.typing = self.typing[:-1]
        elif event.unicode and event.unicode.isprintable():
            self.typing += event.unicode

    def draw(self, screen: Any, font: Any) -> None:
        screen.fill((20, 24, 32))
        y = 8
        for line in self.lines[-LINES:]:
            screen.blit(font.render(line, True, (220, 220, 220)), (10, y))
            y += 22
        screen.blit(
            font.render("> " + self.typing + "_", True, (120, 220, 120)), (10, SIZE[1] - 30)
        )
        self.pg.display.flip()


def run(url: str, frames: int | None, headless: bool) -> Chat:
    if headless:
        os.environ["SDL_VIDEODRIVER"] = "dummy"
        os.environ["SDL_AUDIODRIVER"] = "dummy"
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    import pygame

    from blockws.integrations import pygame as bw_pygame

    pygame.display.init()
    pygame.font.init()
    screen = pygame.display.set_mode(SIZE)
    pygame.display.set_caption("blockws chat")
    font = pygame.font.Font(None, 24)
    chat = Chat(pygame, headless)
    ws = blockws.WebSocket(
        url, on_open=chat.on_open, on_message=chat.on_message, on_closed=chat.on_closed
    )
    network = bw_pygame.attach(ws)  # a pygame event when ws has callbacks pending
    ws.open()
    drawn = 0
    wakeups = 0
    # Headless runs must end even if the network stalls; a window waits for ever.
    timeout = 10_000 if headless else 0
    while frames is None or drawn < frames:
        event = pygame.event.wait(timeout)  # sleeps: no CPU until something happens
        if event.type == pygame.NOEVENT:
            print("nothing happened for 10 s: giving up", file=sys.stderr)
            break
        if event.type == pygame.QUIT:
            break
        if event.type == network:
            wakeups += 1
            ws.update()  # on_open, on_message, on_closed run here
        elif event.type == pygame.KEYDOWN:
            chat.key(ws, event)
        chat.draw(screen, font)
        drawn += 1
        if chat.closed:
            break
    ws.close()
    ws.join(ws.close_timeout)
    ws.update()  # on_closed
    pygame.quit()
    trips = sorted(chat.round_trips)
    if trips:
        print(
            f"round trip: p50 {trips[len(trips) // 2] * 1e3:.2f} ms, "
            f"max {trips[-1] * 1e3:.2f} ms over {len(trips)} lines"
        )
    print(f"{wakeups} wake-ups for the network, {drawn} redraws")
    print(f"{chat.sent} sent, {chat.received} received in {drawn} frames")
    return chat


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "url", nargs="?", help="a ws:// or wss:// URL (default: a local echo server)"
    )
    parser.add_argument(
        "--frames", type=int, help="quit after N redraws (default: until closed; 300 when headless)"
    )
    parser.add_argument("--headless", action="store_true", help="no window; type lines by itself")
    args = parser.parse_args()
    if args.headless and args.frames is None:
        args.frames = 300  # nobody can close a window that is not there
    with contextlib.ExitStack() as stack:
        target = args.url or stack.enter_context(EchoServer()).url
        result = run(target, args.frames, args.headless)
    sys.exit(0 if result.received or not args.headless else 1)
