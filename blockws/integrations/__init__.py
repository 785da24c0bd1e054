"""Glue between blockws and game engines.

* :mod:`blockws.integrations.pygame`: ``attach()`` makes blockws post a
  pygame event when a socket has callbacks pending, so a loop that sleeps in
  ``pygame.event.wait()`` wakes for network messages.
* :mod:`blockws.integrations.panda3d`: ``attach()`` adds a task that runs
  :func:`blockws.update_all` once per frame.

Importing a module here does not import its engine: that happens on the
first call that needs it, so blockws never depends on either.
"""

from __future__ import annotations

__all__: list[str] = []
