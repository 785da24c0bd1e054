"""Shared fixtures: real peer servers, TLS certificates and a leak check.

Server fixtures are session-scoped (the peers keep no state between connections) and yield
the URL to connect to. The peers' text commands (!stats, !close, !ping, !headers,
!subprotocol) are described in tests/peers/ws_echo_server.py.
"""

from __future__ import annotations

import os
import shutil
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import certifi
import pytest
import trustme

from peerutil import PEERS_DIR, free_port, start_server


@dataclass
class TLSCerts:
    """A throwaway CA and a server certificate for localhost, 127.0.0.1 and ::1."""

    ca: trustme.CA
    certfile: str  # server certificate chain, PEM
    keyfile: str  # server private key, PEM
    cafile: str  # the CA's certificate, PEM

    def client_context(self) -> ssl.SSLContext:
        """certifi's bundle plus this CA: what a client trusting the test server uses."""
        ctx = ssl.create_default_context(cafile=certifi.where())
        self.ca.configure_trust(ctx)
        return ctx


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory: pytest.TempPathFactory) -> TLSCerts:
    directory = tmp_path_factory.mktemp("tls")
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
