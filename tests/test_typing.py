"""The public API as a type checker sees it: ``mypy --strict`` on user code."""

from __future__ import annotations

from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api")

pytestmark = pytest.mark.timeout(180)

USER_CODE = '''
import blockws

ws = blockws.connect("ws://example.invalid/", timout=5)
ok = blockws.connect("ws://example.invalid/", timeout=5, open_timeout=3.0, http2=False)
bad = blockws.connect("ws://example.invalid/", send_pings="yes")
text: str | bytes = ok.receive(1.0)
for message in ok:
    print(message)
'''


def test_connect_options_are_typed_one_by_one(tmp_path: Path) -> None:
    source = tmp_path / "user.py"
    source.write_text(USER_CODE)
    out, err, status = mypy_api.run(
        ["--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(source)]
    )
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert status == 1, out + err
    assert len(errors) == 2, out
    assert 'Unexpected keyword argument "timout"' in errors[0]
    assert '"send_pings"' in errors[1] and '"bool"' in errors[1]
