"""Shared fixtures: real peer servers, TLS certificates and a leak check.

Server fixtures are session-scoped (the peers keep no state between connections) and yield
the URL to connect to. The peers' text commands (!stats, !close, !ping, !headers,
!subprotocol) are described in tests/peers/ws_echo_server.py.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import os
import shutil
import ssl
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from memory import MemoryOpener, use_memory

import blockws.dispatcher as dispatcher_module
import blockws.http2
from peerutil import PEERS_DIR, free_port, start_server

if TYPE_CHECKING:
    import trustme  # imported where used: the fast tier (-m unit) never needs it


#: blockws._speedups.run_pending as imported (None without the C speedups).
_C_RUN = dispatcher_module._run_pending


@pytest.fixture(params=["python run", "C run"])
def run_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Dispatcher.run's loop for the test: the Python one (the reference) or
    blockws._speedups.run_pending, when built. A module runs every test on
    both with ``pytest.mark.usefixtures("run_impl")``."""
    if request.param == "C run":
        if _C_RUN is None:
            pytest.skip("the C speedups are not built (or BLOCKWS_PURE_PYTHON is set)")
        monkeypatch.setattr(dispatcher_module, "_run_pending", _C_RUN)
    else:
        monkeypatch.setattr(dispatcher_module, "_run_pending", None)
    return str(request.param)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """With ``-m unit``, skip importing test files that mark nothing ``unit``.

    Importing a test module (and rewriting its asserts, on every run where
    bytecode is not cached) is most of the fast tier's collection time; a
    file whose text never mentions ``mark.unit`` cannot hold a unit test.
    """
    if config.getoption("markexpr") != "unit":
        return None
    if collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    return "mark.unit" not in collection_path.read_text(encoding="utf-8")


def pytest_collection_finish(session: pytest.Session) -> None:
    """Move what collection made (test modules, items, hypothesis strategies: most of
    the heap, and all of it lives to the end) out of the cyclic collector's view.

    Every full collection walked it again: those the run triggers, and the five pytest
    makes at the end of a session; about 1 s of CPU in each xdist worker of the fast
    tier. Objects created by tests are collected as before.
    """
    gc.freeze()


@dataclass
class TLSCerts:
    """A throwaway CA and a server certificate for localhost, 127.0.0.1 and ::1."""

    ca: trustme.CA
    certfile: str  # server certificate chain, PEM
    keyfile: str  # server private key, PEM
    cafile: str  # the CA's certificate, PEM

    def client_context(self) -> ssl.SSLContext:
        """certifi's bundle plus this CA: what a client trusting the test server uses."""
        import certifi

        ctx = ssl.create_default_context(cafile=certifi.where())
        self.ca.configure_trust(ctx)
        return ctx


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory: pytest.TempPathFactory) -> TLSCerts:
    directory = tmp_path_factory.mktemp("tls")
    import trustme  # (cryptography: ~50 ms to import, in every xdist worker)

    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1", "::1")
    certfile, keyfile, cafile = directory / "cert.pem", directory / "key.pem", directory / "ca.pem"
    for i, pem in enumerate(cert.cert_chain_pems):
        pem.write_to_path(str(certfile), append=i > 0)
    cert.private_key_pem.write_to_path(str(keyfile))
    ca.cert_pem.write_to_path(str(cafile))
    return TLSCerts(ca, str(certfile), str(keyfile), str(cafile))


def _websockets_server(scheme_host: str, *flags: str) -> Iterator[str]:
    port = free_port()
    cmd = [sys.executable, str(PEERS_DIR / "ws_echo_server.py"), "--port", str(port), *flags]
    with start_server(cmd, port):
        yield f"{scheme_host}:{port}"


@pytest.fixture(scope="session")
def websockets_server() -> Iterator[str]:
    """``ws://`` URL of a `websockets` echo server, without compression."""
    yield from _websockets_server("ws://127.0.0.1")


@pytest.fixture(scope="session")
def websockets_deflate_server() -> Iterator[str]:
    """``ws://`` URL of a `websockets` echo server offering permessage-deflate."""
    yield from _websockets_server("ws://127.0.0.1", "--deflate")


@pytest.fixture(scope="session")
def websockets_tls_server(tls_certs: TLSCerts) -> Iterator[str]:
    """``wss://localhost`` URL of a `websockets` echo server; trust it with tls_certs."""
    yield from _websockets_server(
        "wss://localhost", "--certfile", tls_certs.certfile, "--keyfile", tls_certs.keyfile
    )


def _node_ws_server(scheme_host: str, *flags: str) -> Iterator[str]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the Node `ws` peer tests need Node.js")
    if not (PEERS_DIR / "node_modules" / "ws").is_dir():
        pytest.fail(
            "tests/peers/node_modules/ws is missing: run "
            "`npm install --prefix tests/peers --no-audit --no-fund` (.ci/run does)"
        )
    port = free_port()
    cmd = [node, str(PEERS_DIR / "node_ws_server.js"), "--port", str(port), *flags]
    with start_server(cmd, port):
        yield f"{scheme_host}:{port}"


@pytest.fixture(scope="session")
def node_ws_server() -> Iterator[str]:
    """``ws://`` URL of a Node `ws` echo server, without compression."""
    yield from _node_ws_server("ws://127.0.0.1")


@pytest.fixture(scope="session")
def node_ws_deflate_server() -> Iterator[str]:
    """``ws://`` URL of a Node `ws` echo server offering permessage-deflate (threshold 0)."""
    yield from _node_ws_server("ws://127.0.0.1", "--deflate")


@pytest.fixture(scope="session")
def node_ws_tls_server(tls_certs: TLSCerts) -> Iterator[str]:
    """``wss://localhost`` URL of a Node `ws` echo server; trust it with tls_certs."""
    yield from _node_ws_server(
        "wss://localhost", "--certfile", tls_certs.certfile, "--keyfile", tls_certs.keyfile
    )


def _hypercorn_server(*flags: str) -> Iterator[str]:
    if importlib.util.find_spec("hypercorn") is None:
        pytest.skip("hypercorn is not installed: pip install -e '.[test]'")
    port = free_port()
    cmd = [sys.executable, "-m", "hypercorn", "-w", "0", "-b", f"127.0.0.1:{port}", *flags,
           "asgi_echo:app"]
    with start_server(cmd, port, cwd=str(PEERS_DIR)):
        yield f"ws://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def hypercorn_echo_server() -> Iterator[str]:
    """``ws://`` URL of hypercorn serving tests/peers/asgi_echo.py (HTTP/1.1, plain TCP).

    hypercorn's WebSocket is wsproto's, which always offers permessage-deflate.
    """
    yield from _hypercorn_server()


_PEER_KINDS = {
    "websockets": lambda flags: _websockets_server("ws://127.0.0.1", *flags),
    "node": lambda flags: _node_ws_server("ws://127.0.0.1", *flags),
    "hypercorn": lambda flags: _hypercorn_server(*flags),
}


class PeerServers:
    """Peer servers started on demand, one per (kind, flags), shared by the whole session.

    ``url(kind, *flags)`` starts ``kind`` ("websockets", "node" or "hypercorn") with those
    command-line flags the first time it is asked for, and returns the same URL afterwards.
    At most ``keep`` run at once: starting another stops the least recently used one (it is
    restarted, on a new port, if asked for again), so testing many flag sets does not pile up
    processes on a small machine. Group tests by flag set to start each once.
    """

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self._running: OrderedDict[tuple[str, tuple[str, ...]], tuple[contextlib.ExitStack, str]]
        self._running = OrderedDict()

    def url(self, kind: str, *flags: str) -> str:
        key = (kind, flags)
        if key in self._running:
            self._running.move_to_end(key)
            return self._running[key][1]
        while len(self._running) >= self.keep:
            _, (old, _url) = self._running.popitem(last=False)
            old.close()
        stack = contextlib.ExitStack()
        try:
            url = stack.enter_context(contextlib.contextmanager(_PEER_KINDS[kind])(flags))
        except BaseException:
            stack.close()
            raise
        self._running[key] = (stack, url)
        return url

    def close(self) -> None:
        while self._running:
            _, (stack, _url) = self._running.popitem()
            stack.close()


@pytest.fixture(scope="session")
def peer_servers() -> Iterator[PeerServers]:
    """Factory of peer servers by command-line flags, e.g. the deflate parameters::

        url = peer_servers.url("node", "--server-no-context-takeover")

    See ``ws_echo_server.py`` and ``node_ws_server.js`` for their flags; hypercorn takes
    its own command-line options.
    """
    servers = PeerServers()
    yield servers
    servers.close()


def _blockws_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("blockws")}


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Opt-in: fail if the test leaves blockws threads running or file descriptors open.

    After the test, waits up to 5 s for new "blockws*" threads to end and the fd count to
    return to what it was before the test.
    """
    threads_before = _blockws_threads()
    fds_before = _fd_count()
    yield
    deadline = time.monotonic() + 5.0
    while True:
        # No event tells when another library's threads end and sockets close: poll briefly.
        leftover = _blockws_threads() - threads_before
        fds_after = _fd_count()
        if (not leftover and fds_after <= fds_before) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert not leftover, f"blockws threads still running: {sorted(t.name for t in leftover)}"
    assert fds_after <= fds_before, (
        f"file descriptors grew from {fds_before} to {fds_after}: "
        f"{sorted(os.listdir('/proc/self/fd'), key=int)}"
    )


#: What blockws's default ``proxy=True`` reads (lower and upper case).
PROXY_VARIABLES = ("wss_proxy", "ws_proxy", "https_proxy", "http_proxy", "all_proxy", "no_proxy")


@pytest.fixture(autouse=True)
def no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sockets read a proxy from the environment by default: a machine's own proxy settings
    must not route the tests' 127.0.0.1 connections. Tests that want a variable set it."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
def coverage_paused() -> Iterator[None]:
    """For tests that weigh blockws's own allocations with tracemalloc: coverage's tracer
    (CI measures coverage) allocates per thread and per newly seen branch, and tracemalloc
    charges that to the blockws frame running then. Pause it for the test."""
    try:
        import coverage
    except ImportError:
        yield
        return
    cov = coverage.Coverage.current()
    if cov is None:
        yield
        return
    cov.stop()
    try:
        yield
    finally:
        cov.start()


@pytest.fixture(autouse=True)
def no_socket_left_live() -> Iterator[None]:
    """A socket a test leaves between open() and on_closed (open, or closed with its
    on_closed never pumped) would stay in the live set that update_all() and the engine
    integrations see in later tests: abort it and pump its on_closed after the test."""
    before = set(map(id, blockws.dispatcher.live_sockets()))
    yield
    for ws in blockws.dispatcher.live_sockets():
        if id(ws) not in before and ws is not None:
            ws.abort()
            ws.join(2)
            with contextlib.suppress(Exception):
                ws.update()


# -- HTTP/2 (RFC 8441) peers: tests/test_http2.py ----------------------------------------


@pytest.fixture(autouse=True)
def fresh_h2_pool() -> Iterator[None]:
    """Isolate tests from the process-wide HTTP/2 pool: no remembered failures, and no
    connection (or its idle job on the shared timer) outlives the test."""
    pool = blockws.http2.pool
    pool.failed_origins.clear()
    yield
    for conn in pool.connections():
        conn.close()
        pool.forget(conn)
    pool.failed_origins.clear()


@pytest.fixture
def tls_context_h2(tls_certs: TLSCerts) -> ssl.SSLContext:
    """A client context trusting tls_certs that offers ALPN ``h2, http/1.1``.

    blockws sets the ALPN list itself on each attempt (blockws.tls), so the list set here
    only stands for a user's context that had one. One per test: blockws's HTTP/2 pool
    shares connections per context.
    """
    ctx = tls_certs.client_context()
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


@dataclass
class H2Server:
    """A WebSocket server reachable over TLS (``wss``) and, if it has one, cleartext (``ws``)."""

    wss: str  # wss://localhost:PORT
    ws: str = ""  # ws://127.0.0.1:PORT (h2c with prior knowledge, and HTTP/1.1), or ""
    proc: object = None  # the server's subprocess.Popen


def _sbin_which(name: str) -> str | None:
    # Debian installs nghttpx and nghttpd in /usr/sbin, not on a non-root user's PATH.
    return shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")


def _hypercorn_h2(
    tls_certs: TLSCerts, directory: str, config: str = "", app: str = "h2_asgi_app:app"
) -> Iterator[H2Server]:
    """hypercorn serving ``app`` over TLS (ALPN from ``config``, default h2) and h2c."""
    if importlib.util.find_spec("hypercorn") is None:
        pytest.skip("hypercorn is not installed: pip install -e '.[test]'")
    tls_port, clear_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "hypercorn", "-w", "0",
           "--certfile", tls_certs.certfile, "--keyfile", tls_certs.keyfile,
           "-b", f"127.0.0.1:{tls_port}", "--insecure-bind", f"127.0.0.1:{clear_port}"]
    if config:
        path = os.path.join(directory, "hypercorn.toml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(config)
        cmd += ["--config", path]
    with start_server([*cmd, app], [tls_port, clear_port], cwd=str(PEERS_DIR)) as proc:
        yield H2Server(f"wss://localhost:{tls_port}", f"ws://127.0.0.1:{clear_port}", proc)


@pytest.fixture(scope="session")
def hypercorn_h2_server(
    tls_certs: TLSCerts, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[H2Server]:
    """hypercorn with RFC 8441, serving tests/peers/h2_asgi_app.py (``!version``, ``!close``,
    ``!headers``): ``.wss`` is TLS with ALPN h2 (and http/1.1), ``.ws`` cleartext h2c and
    HTTP/1.1 on another port."""
    yield from _hypercorn_h2(tls_certs, str(tmp_path_factory.mktemp("hypercorn-h2")))


@pytest.fixture(scope="session")
def hypercorn_h2_three_streams_server(
    tls_certs: TLSCerts, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[H2Server]:
    """Like hypercorn_h2_server, with SETTINGS_MAX_CONCURRENT_STREAMS = 3."""
    yield from _hypercorn_h2(tls_certs, str(tmp_path_factory.mktemp("hypercorn-3")),
                             "h2_max_concurrent_streams = 3\n")


@pytest.fixture(scope="session")
def hypercorn_h1_only_server(
    tls_certs: TLSCerts, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[H2Server]:
    """hypercorn (h2_asgi_app) whose TLS ALPN offers only http/1.1: no HTTP/2 over TLS."""
    yield from _hypercorn_h2(tls_certs, str(tmp_path_factory.mktemp("hypercorn-h1")),
                             'alpn_protocols = ["http/1.1"]\n')


@pytest.fixture(scope="session")
def nghttpx_gateway(tls_certs: TLSCerts, websockets_deflate_server: str) -> Iterator[H2Server]:
    """nghttpx as an RFC 8441 gateway in front of the `websockets` echo peer (with deflate).

    ``.wss`` is nghttpx's TLS frontend (ALPN h2, http/1.1), ``.ws`` its cleartext frontend
    (h2c with prior knowledge, and HTTP/1.1). The peer's text commands (``!stats``,
    ``!close``, ``!headers``...) are in tests/peers/ws_echo_server.py.
    """
    nghttpx = _sbin_which("nghttpx")
    if nghttpx is None:
        pytest.skip("nghttpx is not installed (Debian nghttp2-proxy; .ci/run installs it)")
    backend = websockets_deflate_server.rsplit(":", 1)[1]
    tls_port, clear_port = free_port(), free_port()
    cmd = [nghttpx, "--conf=/dev/null", "--single-process", "--no-ocsp", "--workers=1",
           f"--frontend=127.0.0.1,{tls_port}", f"--frontend=127.0.0.1,{clear_port};no-tls",
           f"--backend=127.0.0.1,{backend}", tls_certs.keyfile, tls_certs.certfile]
    with start_server(cmd, [tls_port, clear_port]) as proc:
        yield H2Server(f"wss://localhost:{tls_port}", f"ws://127.0.0.1:{clear_port}", proc)


@pytest.fixture(scope="session")
def node_h2_server(tls_certs: TLSCerts) -> Iterator[H2Server]:
    """Node's http2 server WITHOUT the extended CONNECT (its SETTINGS lack
    ENABLE_CONNECT_PROTOCOL), TLS with ALPN h2 and http/1.1; WebSocket over HTTP/1.1 only
    (tests/peers/node_h2_server.js: ``!version``, ``!close``, ``!headers``)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the Node http2 peer needs Node.js")
    if not (PEERS_DIR / "node_modules" / "ws").is_dir():
        pytest.fail("tests/peers/node_modules/ws is missing: run "
                    "`npm install --prefix tests/peers --no-audit --no-fund` (.ci/run does)")
    port = free_port()
    cmd = [node, str(PEERS_DIR / "node_h2_server.js"), "--port", str(port),
           "--certfile", tls_certs.certfile, "--keyfile", tls_certs.keyfile]
    with start_server(cmd, port) as proc:
        yield H2Server(f"wss://localhost:{port}", "", proc)


@pytest.fixture(scope="session")
def nghttpd_server(
    tls_certs: TLSCerts, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[H2Server]:
    """nghttpd: an HTTP/2-only file server over TLS, without RFC 8441 and without HTTP/1.1."""
    nghttpd = _sbin_which("nghttpd")
    if nghttpd is None:
        pytest.skip("nghttpd is not installed (Debian nghttp2-server; .ci/run installs it)")
    htdocs = tmp_path_factory.mktemp("htdocs")
    (htdocs / "index.html").write_text("nghttpd\n")
    port = free_port()
    cmd = [nghttpd, "-a", "127.0.0.1", "-d", str(htdocs), str(port),
           tls_certs.keyfile, tls_certs.certfile]
    with start_server(cmd, port) as proc:
        yield H2Server(f"wss://localhost:{port}", "", proc)


@pytest.fixture
def memory(monkeypatch: pytest.MonkeyPatch) -> Iterator[MemoryOpener]:
    """Sockets opened in the test run over memory transports (tests/memory.py)."""
    with use_memory(monkeypatch) as opener:
        yield opener


@pytest.fixture
def live() -> Iterator[list[dispatcher_module.Dispatcher]]:
    """Dispatchers a test makes live (``update_all()`` pumps them): append them,
    and they are removed from the live set after the test."""
    added: list[dispatcher_module.Dispatcher] = []
    yield added
    for d in added:
        dispatcher_module.register(d, False)
