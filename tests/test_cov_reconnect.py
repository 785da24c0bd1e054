"""blockws.reconnect: what tests/test_reconnect.py leaves out (no sockets)."""

from __future__ import annotations

import pytest

import blockws


@pytest.mark.unit
@pytest.mark.parametrize("jitter", ["0.5", True, None])
def test_jitter_that_is_not_a_number_is_a_type_error(jitter: object) -> None:
    with pytest.raises(TypeError, match=r"^Reconnect jitter must be a number, not "
                       + type(jitter).__name__ + "$"):
        blockws.Reconnect(jitter=jitter)  # type: ignore[arg-type]
