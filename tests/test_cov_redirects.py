"""blockws.redirects: what tests/test_redirects.py leaves out (through follow_redirects,
with a stand-in for the opening, no sockets)."""

from __future__ import annotations

import pytest

from blockws.exceptions import InvalidStatus
from blockws.handshake import Headers, Request
from blockws.log import ContextAdapter
from blockws.redirects import follow_redirects


@pytest.mark.unit
def test_userinfo_from_a_location_is_not_inherited_once_credentials_were_dropped() -> None:
    """The chain left the first origin (credentials dropped) for a Location that names its
    own userinfo: that hop uses it, as written; a relative Location from there would
    inherit it through the URL join, and does not: dropped credentials stay dropped."""
    answers = {"ws://u:p@a/1": "ws://v:q@b/2", "ws://v:q@b/2": "/3", "ws://b/3": None}
    opened: list[str] = []
    made: list[tuple[str, bool]] = []

    def open_hop(request: Request) -> str:
        opened.append(request.url)
        location = answers[request.url]
        if location is None:
            return request.url
        raise InvalidStatus(302, "Found", Headers([("Location", location)]))

    def next_request(url: str, keep: bool) -> Request:
        made.append((url, keep))
        return Request(url)

    final = follow_redirects(Request("ws://u:p@a/1"), max_redirects=10, open_hop=open_hop,
                             next_request=next_request, log=ContextAdapter({"id": 0}))
    assert final == "ws://b/3"
    assert made == [("ws://v:q@b/2", False), ("ws://b/3", False)]
    assert opened == ["ws://u:p@a/1", "ws://v:q@b/2", "ws://b/3"]
