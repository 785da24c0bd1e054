"""How hard the property tests (hypothesis) search.

``BLOCKWS_THOROUGH=1`` -- set by ``.ci/run`` for every run -- draws each test's full
count of examples. Without it, as in the fast tier on a developer's machine
(``pytest -m unit``), a test draws a third of them, at least 20: the same
properties, checked on fewer examples.
"""

from __future__ import annotations

import os

THOROUGH = os.environ.get("BLOCKWS_THOROUGH") == "1"


def examples(n: int) -> int:
    """How many examples a property test that asks for ``n`` draws in this run."""
    return n if THOROUGH else max(20, n // 3)
