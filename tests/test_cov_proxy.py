"""blockws.proxy: what tests/test_proxy.py leaves out (no sockets)."""

from __future__ import annotations

import pytest

import blockws
from blockws.proxy import Proxy, bypasses_proxy


@pytest.mark.unit
def test_a_proxy_that_is_not_a_str_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"^proxy must be a URL str, True or None, not int$"):
        blockws.WebSocket("ws://127.0.0.1:9/", proxy=8080)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"not bytes$"):
        Proxy.from_url(b"http://proxy:3128")  # type: ignore[arg-type]


@pytest.mark.unit
def test_a_no_proxy_entry_with_a_bad_port_matches_nothing() -> None:
    """``host:abc`` is no port: the entry is taken whole, as a name no host has, and the
    entries after it still count."""
    assert not bypasses_proxy("host", 80, "host:abc")
    assert not bypasses_proxy("host", 80, "host:")
    assert bypasses_proxy("host", 80, "host:abc, host:80")
    assert bypasses_proxy("other", 80, "host:abc other")
