from typing import Any, Callable

def apply_mask(data: bytes | bytearray | memoryview, key: bytes) -> bytes: ...
def split_messages(
    buf: bytes | bytearray | memoryview,
    pos: int,
    small: int,
    out: list[Any],
    wrap_binary: Callable[[bytes, int], Any] | None,
    wrap_text: Callable[[str], Any] | None,
) -> int: ...
