"""Ctrl-C inside ``update()`` (issue 11, probe "data loss on Ctrl-C"): an
interrupt raised at every eval-breaker point of a pump, one point per run,
and then ``update()`` again until nothing is pending.

What must hold (see "Interrupts" in :mod:`blockws.dispatcher`): every event is
*entered* exactly once and in order -- each message's handler (or the inbox),
``on_open``, ``on_closed`` -- and a callback whose entry the interrupt hit
has had its event (it counts as raised by the callback, not run again). The
backpressure count ends at what is really queued.

Where CPython 3.11 raises a signal handler's exception (``Python/ceval.c``):
at a function's entry (``RESUME``), at backward jumps, and after a call to
anything but an inlined Python function returns. :class:`Interrupts` raises
``KeyboardInterrupt`` from a ``sys.settrace`` hook at the same places: the
entry of every blockws function, of every Python function blockws calls and
of the test's callbacks, and, inside blockws's code (traced per opcode),
before the instruction that follows each call and at each backward jump -- a
superset (it also interrupts after inlined Python calls and at backward jumps
not taken), so what passes here passes there. Points inside the standard
library's own functions are left out: its thread primitives are not
interrupt-safe themselves (an interrupt inside ``Condition.wait()`` makes its
``with`` raise ``RuntimeError``); the point after the call stands for an
interrupt coming out of one.
"""

from __future__ import annotations

import dis
import gc
import os
import sys
import time
from types import CodeType, FrameType
from typing import Any, Callable

import pytest
from memory import MemoryOpener, MemoryTransport, server_frame

import blockws
from blockws import delivery as delivery_module
from blockws import dispatcher as dispatcher_module
from blockws.buffers import BufferPool, BufferSegment
from blockws.delivery import SCRATCH, Delivery
from blockws.dispatcher import Budget, Dispatcher
from blockws.frames import Opcode, pack_close
from blockws.protocol import BinaryMessage

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120), pytest.mark.usefixtures("run_impl")]


BLOCKWS = os.path.dirname(blockws.__file__) + os.sep
HERE = os.path.abspath(__file__)
URL = "ws://memory.invalid/chat"

_CALLS = {"CALL", "CALL_FUNCTION_EX"}
_BACKWARD = {
    "JUMP_BACKWARD",
    "POP_JUMP_BACKWARD_IF_FALSE",
    "POP_JUMP_BACKWARD_IF_TRUE",
    "POP_JUMP_BACKWARD_IF_NONE",
    "POP_JUMP_BACKWARD_IF_NOT_NONE",
}
_points: dict[CodeType, frozenset[int]] = {}


def breaker_offsets(code: CodeType) -> frozenset[int]:
    """Offsets of the instructions before which the interpreter may raise: the
    one after each call, and each backward jump."""
    points = _points.get(code)
    if points is None:
        found = set()
        after_call = False
        for ins in dis.get_instructions(code):
            if after_call or ins.opname in _BACKWARD:
                found.add(ins.offset)
            after_call = ins.opname in _CALLS
        points = _points[code] = frozenset(found)
    return points


class Interrupts:
    """While active, raises ``KeyboardInterrupt`` at the ``target``-th
    eval-breaker point reached on this thread (counting from 1), once.

    ``callbacks`` maps the code of the test's callbacks to a function that
    turns the entered frame into the event it was entered for: their entries
    are recorded in :attr:`entries` (an interrupt at a callback's entry still
    enters it), and their bodies are not traced.
    """

    def __init__(self, target: int, callbacks: dict[CodeType, Callable[[FrameType], Any]]) -> None:
        self.target = target
        self.callbacks = callbacks
        self.count = 0
        self.fired: str | None = None
        self.in_callback = False
        self.entries: list[Any] = []

    def __enter__(self) -> Interrupts:
        # The tracer in place (coverage's, in CI) comes back on exit: setting None
        # there stopped coverage for every later test of the run.
        self._before = sys.gettrace()
        sys.settrace(self._call)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(self._before)

    def _point(self, frame: FrameType, where: str) -> None:
        self.count += 1
        if self.count == self.target:
            self.fired = f"{where} {frame.f_code.co_name} line {frame.f_lineno}"
            outer: FrameType | None = frame
            while outer is not None:
                if outer.f_code in self.callbacks:
                    self.in_callback = True  # the callback was entered: it has had its event
                outer = outer.f_back
            raise KeyboardInterrupt(self.fired)

    def completed(self, expected: list[Any]) -> list[Any]:
        """What the callbacks themselves record: ``expected``, less the event
        whose callback the interrupt hit (entered, but cut short)."""
        if not self.in_callback:
            return expected
        cut = list(expected)
        cut.remove(self.entries[-1])
        return cut

    def _call(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event != "call":
            return None
        code = frame.f_code
        event_of = self.callbacks.get(code)
        if event_of is not None:
            self.entries.append(event_of(frame))
            self._point(frame, "entry of callback")
            return None
        if code.co_filename == HERE:
            return None  # this harness's own code (its __exit__, say)
        if any(getattr(cb, "__code__", None) is code for cb in gc.callbacks):
            # The collector runs these (hypothesis registers one) wherever an
            # allocation triggers it, and swallows what they raise: not a point.
            return None
        if code.co_filename.startswith(BLOCKWS):
            self._point(frame, "entry of")
            frame.f_trace_lines = False
            frame.f_trace_opcodes = True
            return self._opcode
        caller = frame.f_back
        if caller is not None and caller.f_code.co_filename.startswith(BLOCKWS):
            # A Python function blockws calls (the standard library's, say)
            # raises at its entry; deeper inside, the standard library's own
            # primitives are not interrupt-safe (an interrupt inside
            # Condition.wait() makes its ``with`` raise RuntimeError), which is
            # beyond what blockws can fix: the points after the call, in the
            # caller, stand for an interrupt coming out of it.
            self._point(frame, "entry of")
        return None

    def _opcode(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode" and frame.f_lasti in breaker_offsets(frame.f_code):
            self._point(frame, "in")
        return self._opcode


def interrupt_everywhere(
    make: Callable[[], Any],
    pump: Callable[[Any], Any],
    check: Callable[[Any, Interrupts], None],
    limit: int = 5000,
) -> int:
    """For target = 1, 2, ...: ``state = make()``, ``pump(state)`` with an
    interrupt at the target-th point, then ``check(state, interrupts)``
    (which pumps the rest). Ends at the first target past the last point;
    returns how many points were tried."""
    for target in range(1, limit):
        state = make()
        interrupts = Interrupts(target, state.callbacks)
        with interrupts:
            try:
                pump(state)
            except KeyboardInterrupt:
                pass
        try:
            check(state, interrupts)
        except AssertionError as exc:
            where = f"interrupt at point {target} ({interrupts.fired})"
            raise AssertionError(f"{where}: {exc}") from exc
        if interrupts.fired is None:
            return target - 1
    raise AssertionError("more eval-breaker points than expected")


def entered(recorded: list[Any], interrupts: Interrupts, armed_count: int) -> list[Any]:
    """What was entered: the callbacks' entries seen by the hook while it was
    armed, then what the callbacks recorded after."""
    return interrupts.entries + recorded[armed_count:]


# -- delivery, without a socket ---------------------------------------------------------


class Socket:
    """The socket as Delivery sees it, with recording handlers."""

    def __init__(self, text: bool = True, binary: bool = True) -> None:
        self.seen: list[Any] = []
        self.on_message = self.text if text else None
        self.on_binary = self.binary if binary else None

    def text(self, ws: Any, message: str) -> None:
        self.seen.append(message)

    def binary(self, ws: Any, segment: BufferSegment) -> None:
        self.seen.append(bytes(segment))


def _text_event(frame: FrameType) -> Any:
    return frame.f_locals["message"]


def _binary_event(frame: FrameType) -> Any:
    return bytes(frame.f_locals["segment"])


CALLBACKS = {Socket.text.__code__: _text_event, Socket.binary.__code__: _binary_event}


class Reads:
    """Five reads' worth of messages posted as the reading side posts them."""

    def __init__(self, handlers: bool, budget: int | str | None = None) -> None:
        self.ws = Socket(text=handlers, binary=handlers)
        self.dispatcher = Dispatcher()
        self.pool = BufferPool()
        self.delivery = Delivery(self.ws, self.dispatcher, self.pool)
        self.delivery.limit = 64  # backpressure on: the reads below pause and resume it
        self.callbacks = CALLBACKS
        self.budget = budget
        big = b"B" * (SCRATCH + 10)
        pooled = self.pool.allocate(300)
        pooled[:300] = b"P" * 300
        reads: list[list[Any]] = [
            ["t1", b"b2", "t3"],
            [big, BinaryMessage(pooled, 300), "t6"],
            ["t7"],
            [b"b8", b"b9", b"b10", "t11"],  # a read that starts with a run of small binaries
            ["t12", "t13", "t14"],  # a run of text messages, whole
        ]
        self.expected = [
            *["t1", b"b2", "t3", big, b"P" * 300, "t6", "t7"],
            *[b"b8", b"b9", b"b10", "t11", "t12", "t13", "t14"],
        ]
        self.drained = 0
        self.delivery.on_drained = self._drained
        self.taken: list[Any] = []
        for messages in reads:
            self.delivery.received(sum(map(len, messages)))
            self.dispatcher.post_held(self.delivery.messages, messages)

    def _drained(self) -> None:
        self.drained += 1

    def pump(self) -> int:
        """update() until nothing is pending (one call without a budget)."""
        count = 0
        for _ in range(20):
            if not self.dispatcher.pending:
                break
            if self.budget is None:
                count += self.dispatcher.run()
            elif self.budget == "time":  # chunks of 1, 2, 4... (the time never runs out)
                count += self.dispatcher.run(Budget.of(None, 60.0))
            else:
                count += self.dispatcher.run(Budget.of(self.budget, None))
        if self.ws.on_message is None:  # then receive() takes them from the inbox
            for _ in range(len(self.delivery.inbox or ())):
                self.taken.append(self.delivery.take())
        return count


def _check_reads(state: Reads, interrupts: Interrupts) -> None:
    armed = len(state.ws.seen)
    for _ in range(100):
        if not state.dispatcher.pending:
            break
        state.pump()
    assert not state.dispatcher.pending
    delivery = state.delivery
    if state.ws.on_message is None:  # no handlers: the inbox, then take() (receive())
        assert delivery.queued == sum(map(len, delivery.inbox or ()))
        assert state.taken + list(delivery.inbox or ()) == state.expected
        while delivery.inbox:
            state.taken.append(delivery.take())
        assert state.taken == state.expected
        assert state.drained >= 1  # the pause ended, with on_drained
    else:
        assert entered(state.ws.seen, interrupts, armed) == state.expected
        assert state.ws.seen == interrupts.completed(state.expected)
    assert delivery.queued == 0, "backpressure count left over"
    assert not delivery.paused
    assert state.dispatcher.held is None


@pytest.mark.parametrize(
    "budget",
    [None, 1, 2, "time"],
    ids=["no budget", "max_callbacks=1", "max_callbacks=2", "max_time"],
)
@pytest.mark.parametrize("handlers", [True, False], ids=["callbacks", "inbox"])
@pytest.mark.parametrize("loop", ["c", "python"])
def test_interrupt_at_every_point_of_delivery_loses_and_repeats_nothing(
    handlers: bool, budget: int | str | None, loop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Probe "data loss on Ctrl-C" (issue 11, item 1), the update() side: the
    messages of five reads (text, small and large binary, pooled binary, a
    run of small binaries, a run of text), with backpressure paused,
    interrupted at each eval-breaker point in turn; with the C loop for runs
    of small binaries (blockws._speedups.lend_each) and with the pure-Python
    one."""
    if loop == "python":
        monkeypatch.setattr(delivery_module, "_lend_each", None)
    elif delivery_module._lend_each is None:
        pytest.skip("the C loop is not in use (BLOCKWS_PURE_PYTHON, or not built)")
    tried = interrupt_everywhere(
        lambda: Reads(handlers, budget), Reads.pump, _check_reads
    )
    assert tried > 30  # the harness reached blockws's code


class Events:
    """Plain items (post) and their commit-on-entry rule, around held ones."""

    def __init__(self) -> None:
        self.dispatcher = Dispatcher()
        self.seen: list[Any] = []
        self.callbacks = {Events.plain.__code__: lambda f: ("plain", f.f_locals["arg"])}
        for i in range(3):
            self.dispatcher.post(self.plain, i)
        self.dispatcher.post(self.seen.append, ("append", 3))  # a C function: no entry to hit

    def plain(self, arg: int) -> None:
        self.seen.append(("plain", arg))


def _check_events(state: Events, interrupts: Interrupts) -> None:
    armed = len(state.seen)
    for _ in range(10):
        if state.dispatcher.pending:
            state.dispatcher.run()
    assert not state.dispatcher.pending, "items left that update() does not run"
    plain = [("plain", 0), ("plain", 1), ("plain", 2)]
    assert interrupts.entries + [e for e in state.seen[armed:] if e[0] == "plain"] == plain
    assert state.seen == interrupts.completed([*plain, ("append", 3)])
    assert marks_are_clear(state.dispatcher)


def marks_are_clear(dispatcher: Dispatcher) -> bool:
    """run()'s re-entrancy marks are gone: a later update() runs callbacks."""
    return dispatcher.running_in is None and not dispatcher_module.in_callback()


def test_interrupt_at_every_point_of_plain_items_runs_each_once(run_impl: str) -> None:
    """Items posted with post() count as run once entered; the run's own
    bookkeeping (re-entrancy marks) is never left behind. (The C loop has no
    point of its own: only the callbacks' entries and bodies.)"""
    points = interrupt_everywhere(Events, lambda s: s.dispatcher.run(), _check_events)
    assert points > (5 if run_impl == "python run" else 3)


# -- a whole socket over a memory transport: on_open, messages, on_closed ------------------


class Loaded:
    """A socket whose open, messages, close and end are all queued, its threads gone."""

    def __init__(self, opener: MemoryOpener, pump_all: bool | int) -> None:
        self.seen: list[Any] = []
        self.pump_all = pump_all
        self.callbacks: dict[CodeType, Callable[[FrameType], Any]] = {
            Loaded.on_open.__code__: lambda f: ("open",),
            Loaded.on_message.__code__: lambda f: ("text", f.f_locals["text"]),
            Loaded.on_binary.__code__: lambda f: ("binary", bytes(f.f_locals["segment"])),
            Loaded.on_closed.__code__: lambda f: ("closed", f.f_locals["code"]),
        }
        ws = blockws.WebSocket(
            URL,
            extensions=[],
            on_open=self.on_open,
            on_message=self.on_message,
            on_binary=self.on_binary,
            on_closed=self.on_closed,
        )
        self.ws = ws
        ws.open()
        deadline = time.monotonic() + 5
        while not opener.transports or not ws._pending:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        transport: MemoryTransport = opener.transports[-1]
        transport.feed(server_frame(Opcode.TEXT, b"one") + server_frame(Opcode.BINARY, b"\x02"))
        transport.feed(server_frame(Opcode.TEXT, b"three"))
        transport.feed(server_frame(Opcode.CLOSE, pack_close(1000, "bye")))
        transport.feed_eof()
        assert ws.join(5)
        assert ws._engine.join_threads(5)  # on_closed is posted by then
        self.expected = [
            ("open",),
            ("text", "one"),
            ("binary", b"\x02"),
            ("text", "three"),
            ("closed", 1000),
        ]

    def on_open(self, ws: Any) -> None:
        self.seen.append(("open",))

    def on_message(self, ws: Any, text: str) -> None:
        self.seen.append(("text", text))

    def on_binary(self, ws: Any, segment: BufferSegment) -> None:
        self.seen.append(("binary", bytes(segment)))

    def on_closed(self, ws: Any, code: int, reason: str) -> None:
        self.seen.append(("closed", code))

    def pump(self) -> int:
        """``pump_all``: False, ws.update(); True, update_all(); a number,
        update_all(max_callbacks=that number)."""
        if self.pump_all is False:
            return self.ws.update()
        if self.pump_all is True:
            return blockws.update_all()
        return blockws.update_all(max_callbacks=self.pump_all)


def _check_loaded(state: Loaded, interrupts: Interrupts) -> None:
    armed = len(state.seen)
    for _ in range(50):
        if not state.ws._pending:
            break
        state.pump()
    assert not state.ws._pending, "events left that update() does not run"
    assert entered(state.seen, interrupts, armed) == state.expected
    assert state.seen == interrupts.completed(state.expected)
    assert state.ws not in blockws.dispatcher.live_sockets()  # on_closed ran: it left
    assert marks_are_clear(state.ws._dispatcher)



@pytest.mark.parametrize(
    "pump_all", [False, True, 2], ids=["ws.update", "update_all", "update_all(max_callbacks=2)"]
)
def test_interrupt_at_every_point_of_update_fires_each_event_once(
    memory: MemoryOpener, pump_all: bool | int
) -> None:
    """Probe "data loss on Ctrl-C" (issue 11, item 1): a Ctrl-C in a game's
    ``update()`` dropped a queued item -- the messages of a read, or an
    ``on_open``/``on_closed`` (which then never fired). Interrupted at each
    eval-breaker point in turn, then pumped again: on_open, every message and
    on_closed are each entered exactly once, in order."""
    tried = interrupt_everywhere(lambda: Loaded(memory, pump_all), Loaded.pump, _check_loaded)
    assert tried > 30


class Failing(Loaded):
    """A message, then a frame with a reserved opcode: the failing close is
    held back behind the message's callback (a held item of its own)."""

    def __init__(self, opener: MemoryOpener) -> None:
        self.seen = []
        self.pump_all = False
        self.callbacks = {
            Loaded.on_open.__code__: lambda f: ("open",),
            Loaded.on_message.__code__: lambda f: ("text", f.f_locals["text"]),
            Loaded.on_closed.__code__: lambda f: ("closed", f.f_locals["code"]),
        }
        ws = blockws.WebSocket(
            URL,
            extensions=[],
            on_open=self.on_open,
            on_message=self.on_message,
            on_closed=self.on_closed,
        )
        self.ws = ws
        ws.open()
        deadline = time.monotonic() + 5
        while not opener.transports or not ws._pending:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        self.transport: MemoryTransport = opener.transports[-1]
        self.transport.feed(server_frame(Opcode.TEXT, b"hi") + server_frame(0xB, b""))
        while len(ws._pending) < 3:  # on_open, the message, the held-back close
            assert time.monotonic() < deadline
            time.sleep(0.001)


def _check_failing(state: Failing, interrupts: Interrupts) -> None:
    armed = len(state.seen)
    ws, transport = state.ws, state.transport
    for _ in range(10):
        if ws._pending:
            ws.update()
    deadline = time.monotonic() + 5
    while not transport.aborted and not any(f.opcode == Opcode.CLOSE for f in transport.frames()):
        assert time.monotonic() < deadline, "the failing close neither sent nor the socket dropped"
        time.sleep(0.001)
    if not transport.aborted:
        assert [(f.opcode, f.payload) for f in transport.frames()] == [
            (Opcode.CLOSE, pack_close(1002, ""))
        ]
        transport.feed(server_frame(Opcode.CLOSE, pack_close(1002)))
        transport.feed_eof()
    assert ws.join(5)
    assert ws._engine.join_threads(5)
    for _ in range(10):
        if ws._pending:
            ws.update()
    assert not ws._pending
    # 1002 after the closing handshake; 1006 if the interrupt cut the release
    # of the close short and the socket was dropped instead (never silence).
    assert ws.close_code == 1002 or (ws.close_code == 1006 and transport.aborted)
    assert isinstance(ws.error, blockws.ProtocolError)
    expected = [("open",), ("text", "hi"), ("closed", ws.close_code)]
    assert entered(state.seen, interrupts, armed) == expected
    assert state.seen == interrupts.completed(expected)
    assert ws not in blockws.dispatcher.live_sockets()


def test_interrupt_at_every_point_of_a_held_back_failing_close(
    memory: MemoryOpener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Probe "data loss on Ctrl-C" with a protocol error: the failing close,
    held back behind the callbacks of the messages before it, is sent, or
    the socket is dropped (1006), whatever point the interrupt hits; the
    message before it and on_closed are entered once."""
    monkeypatch.setattr(blockws.connection, "FAILURE_GRACE", 60.0)  # update() releases it
    tried = interrupt_everywhere(lambda: Failing(memory), Loaded.pump, _check_failing)
    assert tried > 20


# -- what the restructured chunking must keep ---------------------------------------------


def test_the_last_chunk_of_a_read_is_charged_to_a_time_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """_within now queues the rest of a read before each chunk (for interrupts):
    the chunk that ends the read is still charged, so a time budget it spends
    stops the run there, before the next item."""
    now = [0.0]
    monkeypatch.setattr("blockws.dispatcher._perf", lambda: now[0])
    monkeypatch.setattr("blockws.delivery._perf", lambda: now[0])
    ws = Socket()
    dispatcher = Dispatcher()
    delivery = Delivery(ws, dispatcher, BufferPool())

    def text(_: Any, message: str) -> None:
        ws.seen.append(message)
        if message == "m6":
            now[0] += 1.0  # the last message spends the budget

    ws.on_message = text
    batch = [f"m{i}" for i in range(7)]  # chunks of 1, 2 and 4: the clock stands still before m6
    dispatcher.post_held(delivery.messages, batch)
    dispatcher.post_held(ws.seen.append, "next item")
    assert dispatcher.run(Budget.of(None, 0.5)) == 7
    assert ws.seen == batch
    assert dispatcher.run() == 1
    assert ws.seen == [*batch, "next item"]
