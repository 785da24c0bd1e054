"""Pygame: wake a loop that sleeps in ``pygame.event.wait()`` when messages arrive.

::

    import pygame, blockws
    from blockws.integrations import pygame as bw_pygame

    pygame.init()
    ws = blockws.WebSocket(url, on_message=show)
    NETWORK = bw_pygame.attach(ws)       # an event type of its own
    ws.open()
    while running:
        event = pygame.event.wait()      # no CPU while nothing happens
        if event.type == NETWORK:
            ws.update()                  # on_message runs here, on this thread
        elif ...

:func:`attach` sets the socket's ``on_pending`` hook (or, without a socket,
the hook of every socket: :func:`blockws.set_on_pending`) to post one event
of its type. Events are coalesced: a new one is posted only when none of that
type is already in pygame's queue, so a flood of messages costs one event,
and the queue never holds more than one per type. The event's ``ws``
attribute is the socket that has callbacks pending; with one type for several
sockets (``attach()`` with no socket, or one ``event_type`` passed to several
calls), handle it with :func:`blockws.update_all`, which pumps them all.

Threads: the event is posted from blockws's reader thread (pygame 2's
``event.post`` and ``event.peek(pump=False)`` are safe from any thread), or
from the thread of ``update()`` when it returns with callbacks still pending
(a budget ran out), so an event-driven loop comes back for the rest.

``pygame.display.init()`` (``pygame.init()``) must have run before a message
arrives: without it pygame cannot queue events, and the hook logs the error
to the ``blockws`` logger; the callbacks stay pending for the next
``update()``. Importing this module does not import pygame; :func:`attach`
does.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..dispatcher import set_on_pending
from ..websocket import WebSocket

__all__ = ["attach", "detach"]


def _pygame() -> Any:
    # Imported on first use, so that importing blockws.integrations never
    # imports pygame (and its banner, and SDL) for programs that do not use it.
    return importlib.import_module("pygame")


class _Poster:
    """The ``on_pending`` hook: post one event of ``event_type`` unless one is queued."""

    __slots__ = ("event_type", "_event", "_post", "_peek")

    def __init__(self, pygame: Any, event_type: int) -> None:
        self.event_type = event_type
        self._event = pygame.event.Event
        self._post = pygame.event.post
        self._peek = pygame.event.peek

    def __call__(self, ws: WebSocket) -> None:
        event_type = self.event_type
        # pump=False: pumping SDL's events is for the main thread only.
        if not self._peek(event_type, pump=False):
            self._post(self._event(event_type, ws=ws))

    def __repr__(self) -> str:
        return f"<blockws.integrations.pygame hook for event type {self.event_type}>"


def attach(ws: WebSocket | None = None, event_type: int | None = None) -> int:
    """Post a pygame event when ``ws`` (or, with ``None``, any socket) has callbacks pending.

    Returns the event type: ``event_type`` if given, else a new one from
    ``pygame.event.custom_type()``. The loop calls ``ws.update()`` (or
    :func:`blockws.update_all` when ``ws`` is ``None``) when it sees that
    event, or every frame. Replaces the socket's (or the global) ``on_pending``
    hook; if callbacks are already pending, the first event is posted at once.
    Raises ``TypeError`` for an ``event_type`` that is not an int, and
    ``ImportError`` when pygame is not installed.
    """
    if event_type is not None and (type(event_type) is bool or not isinstance(event_type, int)):
        raise TypeError(f"event_type must be an int, not {type(event_type).__name__}")
    if ws is not None and not isinstance(ws, WebSocket):
        raise TypeError(f"attach() takes a blockws.WebSocket or None, not {type(ws).__name__}")
    pygame = _pygame()
    if event_type is None:
        event_type = int(pygame.event.custom_type())
    hook = _Poster(pygame, event_type)
    if ws is None:
        set_on_pending(hook)
    else:
        ws.on_pending = hook
    return event_type


def detach(ws: WebSocket | None = None) -> None:
    """Remove the hook :func:`attach` set on ``ws`` (or the global one).

    Events already posted stay in pygame's queue.
    """
    if ws is None:
        set_on_pending(None)
    else:
        ws.on_pending = None
