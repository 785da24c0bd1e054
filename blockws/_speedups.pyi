from collections.abc import Sequence
from typing import Any, Callable

def apply_mask(data: bytes | bytearray | memoryview, key: bytes) -> bytes: ...
def encode_frame(first_byte: int, payload: bytes | bytearray | memoryview, key: bytes) -> bytes: ...
def encode_frames(
    first: int,
    payload: bytes | bytearray | memoryview,
    start: int,
    limit: int,
    take: Callable[[int], bytes],
    budget: int,
) -> tuple[list[bytes], int]: ...
def encode_frames_into(
    first: int,
    payload: bytes | bytearray | memoryview,
    start: int,
    limit: int,
    take: Callable[[int], bytes],
    budget: int,
    out: bytearray | memoryview,
) -> tuple[int, int]: ...
def encode_piece_into(
    first: int,
    payload: bytes | bytearray | memoryview,
    start: int,
    limit: int,
    key: bytes,
    budget: int,
    out: bytearray | memoryview,
) -> tuple[int, int]: ...
def scatter_views(
    into: memoryview, spare: memoryview, start: int, base: int, length: int, frames: int, head: int
) -> list[memoryview]: ...
def scan_scattered(
    headers: bytes | bytearray | memoryview,
    head: int,
    more: bytes,
    last: bytes,
    n: int,
    length: int,
    frames: int,
) -> tuple[int, int, int, bool, int]: ...
def encode_messages(
    items: list[tuple[Any, ...]], start: int, limit: int, take: Callable[[int], bytes]
) -> tuple[bytes, int]: ...
def total_length(messages: list[Any]) -> int: ...
def lend_each(messages: list[Any], ws: Any, segment: Any, progress: list[int]) -> int: ...
def inflate_run(
    buf: bytes,
    pos: int,
    decomp: Any,
    room: int,
    limit: int,
    budget: int,
    inflated: int,
    out: list[Any],
    wrap: Callable[[str], Any] | None,
    wrap_binary: Callable[[bytes, int], Any] | None,
    join_max: int,
) -> tuple[int, int, int, Any]: ...
def split_messages(
    buf: bytes | bytearray | memoryview,
    pos: int,
    small: int,
    out: list[Any],
    wrap_binary: Callable[[bytes, int], Any] | None,
    wrap_text: Callable[[str], Any] | None,
) -> int: ...
def copy_continuations(
    buf: bytes | bytearray | memoryview,
    pos: int,
    end: int,
    target: bytearray | memoryview,
    m_len: int,
    limit: int,
    m_frames: int,
) -> tuple[int, int, int]: ...

def read_here(
    token: Any,
    read: Callable[[float | None], bytes | int | None],
    sink: Any,
    timeout: float | None,
    wake: Callable[[], None],
    held: list[bytes | int] | None,
) -> bool: ...
def receive_whole(conn: Any, data: Any, clock: Callable[[], float]) -> bool: ...
def reset_keys() -> None: ...
def run_pending(
    dispatcher: Any, pending: Any, run_lock: Any, running: dict[int, int], plain: type
) -> int: ...

# POSIX only (absent on Windows): a reader thread's blocking reads behind the GIL gate.
def gated_recv(sock: Any, size: int) -> bytes: ...
def gated_recv_into(sock: Any, buffer: memoryview | bytearray) -> int: ...
def reset_gate() -> None: ...

class BytesBuffer:
    def __init__(self, size: int) -> None: ...
    def __len__(self) -> int: ...
    def __buffer__(self, flags: int) -> memoryview: ...
    def take(self, n: int) -> bytes: ...

class SendQueue:
    control: list[Any]
    rest: Sequence[Any]
    open: bool
    direct: bool
    direct_ok: bool
    writing: bool
    waiting: bool
    running: bool
    large_direct: bool
    buffered: int
    compress_from: int
    def __init__(
        self,
        lock: Any,
        owner: Any,
        refused: Callable[[], BaseException],
        control: list[Any],
        rest: Sequence[Any],
        direct_max: int,
        batch: int,
        uncompressed: int,
    ) -> None: ...
    def __len__(self) -> int: ...
    def push(self, opcode: int, payload: Any, segment: Any, size: int) -> None: ...
    def push_locked(self, opcode: int, payload: Any, segment: Any, size: int) -> bool: ...
    def append(self, item: tuple[int, Any, Any, int]) -> None: ...
    def take(self, limit: int) -> tuple[list[tuple[int, Any, Any, int]], int, bool, bool]: ...
    def drain(self) -> list[tuple[int, Any, Any, int]]: ...
    def set_fast(self, transport: Any, fd: int) -> bool: ...
