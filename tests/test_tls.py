"""TLS (blockws/tls.py) against real servers: the default trust, SSLKEYLOGFILE, mutual TLS,
and failure messages that say what to do.

Servers: the `websockets` echo peer over TLS (a trustme certificate for localhost, 127.0.0.1
and ::1; and one that has expired), and hypercorn requiring a client certificate (RFC 8441
and HTTP/1.1 on one port). The default context is built once per process and read from the
environment then, so the tests of the environment variables run a subprocess.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faultserver import Recorder

import blockws
import blockws.opening
import blockws.tls
from blockws.exceptions import TLSError
from blockws.http2 import HTTP2Settings
from peerutil import PEERS_DIR, free_port, start_server

pytestmark = pytest.mark.timeout(60)

TIMEOUT = 10.0
ROOT = str(Path(blockws.__file__).resolve().parent.parent)

#: Connects with blockws's defaults, echoes one message; exit 3 and the message on TLSError.
CLIENT = """
import sys
import blockws
try:
    with blockws.connect(sys.argv[1], timeout=10) as ws:
        ws.send("over tls")
        print(ws.receive(timeout=5), ws.http_version)
except blockws.TLSError as exc:
    print(exc)
    sys.exit(3)
"""


def run_client(url: str, **env: str) -> subprocess.CompletedProcess[str]:
    """CLIENT in a fresh interpreter, with ``env`` on top of this environment minus every
    variable that changes the trust."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR", "SSLKEYLOGFILE")}
    base["PYTHONPATH"] = ROOT + os.pathsep + base.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", CLIENT, url], env={**base, **env},
                          capture_output=True, text=True, timeout=30)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


# -- large messages over TLS and over plain TCP ----------------------------------------------


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_large_messages_arrive_whole(websockets_server: str, websockets_tls_server: str,
                                     tls_certs: Any, tls: bool) -> None:
    """Issue 14: over plain TCP a large message's fragments go out with one sendmsg
    per batch, over TLS (no sendmsg) through the writer's buffer; either way the
    echoes come back whole, in order, with a ping answered between them."""
    url = websockets_tls_server if tls else websockets_server
    options: dict[str, Any] = {"ssl_context": tls_certs.client_context()} if tls else {}
    messages = [bytes([i]) * 3 + os.urandom(700_000 + i) for i in range(3)]
    with blockws.connect(url, timeout=TIMEOUT, extensions=[], **options) as ws:
        for message in messages:
            ws.send(message)
        ws.ping(b"between")
        for message in messages:
            assert ws.receive(timeout=TIMEOUT) == message
        ws.send("done")
        assert ws.receive(timeout=TIMEOUT) == "done"


# -- the default context ------------------------------------------------------------------


def test_ssl_cert_file_is_trusted(websockets_tls_server: str, tls_certs: Any,
                                  tmp_path: Path) -> None:
    """Issue 10: ``SSL_CERT_FILE=ca.pem python app.py`` reached nothing before (certifi's
    bundle only); it connects now. SSLKEYLOGFILE gets the session's secrets."""
    keylog = tmp_path / "keys.log"
    done = run_client(websockets_tls_server, SSL_CERT_FILE=tls_certs.cafile,
                      SSLKEYLOGFILE=str(keylog))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.split() == ["over", "tls", "1.1"]
    secrets = keylog.read_text()
    assert "CLIENT_TRAFFIC_SECRET_0" in secrets or "CLIENT_RANDOM" in secrets, secrets[:200]


def test_without_ssl_cert_file_the_private_ca_is_not_trusted(websockets_tls_server: str
                                                             ) -> None:
    done = run_client(websockets_tls_server)
    assert done.returncode == 3, done.stdout + done.stderr
    message = done.stdout
    assert f"localhost:{port_of(websockets_tls_server)}" in message
    assert "SSL_CERT_FILE" in message and "not a CA this client trusts" in message


def test_ssl_cert_dir_is_trusted(websockets_tls_server: str, tls_certs: Any,
                                 tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to name a hashed CA directory")
    subject_hash = subprocess.run([openssl, "x509", "-hash", "-noout", "-in", tls_certs.cafile],
                                  capture_output=True, text=True, check=True).stdout.strip()
    directory = tmp_path / "certs"
    directory.mkdir()
    shutil.copy(tls_certs.cafile, directory / f"{subject_hash}.0")
    done = run_client(websockets_tls_server, SSL_CERT_DIR=str(directory))
    assert done.returncode == 0, done.stdout + done.stderr


def test_build_default_context_reads_the_environment_given(websockets_tls_server: str,
                                                           tls_certs: Any) -> None:
    ctx = blockws.tls.build_default_context({"SSL_CERT_FILE": tls_certs.cafile})
    with blockws.connect(websockets_tls_server, timeout=TIMEOUT, ssl_context=ctx) as ws:
        ws.send("x")
        assert ws.receive(TIMEOUT) == "x"
    with pytest.raises(TLSError):
        blockws.connect(websockets_tls_server, timeout=TIMEOUT,
                        ssl_context=blockws.tls.build_default_context({}))


@pytest.mark.unit
def test_default_context_is_built_once_and_verifies() -> None:
    ctx = blockws.tls.default_context()
    assert blockws.tls.default_context() is ctx
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.cert_store_stats()["x509_ca"] > 0  # certifi's bundle at least


@pytest.mark.unit
def test_unreadable_ssl_cert_file_is_skipped_with_a_warning(tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture
                                                            ) -> None:
    ctx = blockws.tls.build_default_context({"SSL_CERT_FILE": str(tmp_path / "missing.pem"),
                                             "SSL_CERT_DIR": str(tmp_path / "nodir")})
    assert ctx.cert_store_stats()["x509_ca"] > 0
    assert "SSL_CERT_FILE" in caplog.text and "SSL_CERT_DIR" in caplog.text


# -- mutual TLS -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mtls_server(tls_certs: Any) -> Iterator[str]:
    """hypercorn (h2_asgi_app, RFC 8441 and HTTP/1.1) that requires a client certificate
    issued by the test CA."""
    tls_port = free_port()
    cmd = [sys.executable, "-m", "hypercorn", "-w", "0",
           "--certfile", tls_certs.certfile, "--keyfile", tls_certs.keyfile,
           "--ca-certs", tls_certs.cafile, "--verify-mode", "CERT_REQUIRED",
           "-b", f"127.0.0.1:{tls_port}", "h2_asgi_app:app"]
    with start_server(cmd, tls_port, cwd=str(PEERS_DIR)):
        yield f"wss://localhost:{tls_port}"


@pytest.mark.parametrize("http2", [True, False])
def test_client_certificate_through_ssl_context(mtls_server: str, tls_certs: Any,
                                                http2: bool) -> None:
    ctx = blockws.create_default_context()  # the default trust, plus ours
    tls_certs.ca.configure_trust(ctx)
    tls_certs.ca.issue_cert("client.example").configure_cert(ctx)
    with blockws.connect(mtls_server, timeout=TIMEOUT, ssl_context=ctx, http2=http2) as ws:
        assert ws.http_version == ("2" if http2 else "1.1")
        ws.send("!version")
        assert ws.receive(TIMEOUT) == ws.http_version
    assert ws.error is None


@pytest.mark.parametrize("tls12", [False, True])
def test_missing_client_certificate_fails_with_advice(mtls_server: str, tls_certs: Any,
                                                      tls12: bool) -> None:
    """TLS 1.2 fails in the handshake (an alert); over TLS 1.3 hypercorn closes the
    connection after the client's handshake is done, without an alert."""
    ctx = tls_certs.client_context()
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    rec = Recorder()
    ws = blockws.WebSocket(mtls_server, ssl_context=ctx, **rec.callbacks())
    ws.open()
    assert rec.wait_closed(ws) == (1006, "")
    if tls12:
        assert isinstance(ws.error, TLSError), repr(ws.error)
    else:
        assert isinstance(ws.error, blockws.InvalidHeader), repr(ws.error)
    message = str(ws.error)
    assert f"localhost:{port_of(mtls_server)}" in message
    assert "client certificate" in message and "load_cert_chain" in message


# -- failures that say what to do -------------------------------------------------------------


@pytest.fixture(scope="module")
def expired_server(tls_certs: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The `websockets` echo peer with a certificate of the test CA that expired in 2020."""
    cert = tls_certs.ca.issue_cert(
        "localhost", "127.0.0.1",
        not_before=datetime.datetime(2019, 1, 1, tzinfo=datetime.timezone.utc),
        not_after=datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc))
    directory = tmp_path_factory.mktemp("expired")
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    cert.private_key_pem.write_to_path(str(keyfile))
    for i, pem in enumerate(cert.cert_chain_pems):
        pem.write_to_path(str(certfile), append=i > 0)
    port = free_port()
    cmd = [sys.executable, str(PEERS_DIR / "ws_echo_server.py"), "--port", str(port),
           "--certfile", str(certfile), "--keyfile", str(keyfile)]
    with start_server(cmd, port):
        yield f"wss://localhost:{port}"


def tls_failure(url: str, **options: Any) -> str:
    with pytest.raises(TLSError) as info:
        blockws.connect(url, timeout=TIMEOUT, **options)
    assert isinstance(info.value.__cause__, ssl.SSLError)
    return str(info.value)


def test_untrusted_ca_names_the_issuer(websockets_tls_server: str) -> None:
    message = tls_failure(websockets_tls_server,
                          ssl_context=blockws.tls.build_default_context({}))
    assert f"localhost:{port_of(websockets_tls_server)}" in message
    assert "issuer 'trustme" in message  # trustme's CA names itself "trustme v1.x"
    assert "SSL_CERT_FILE=/path/to/ca.pem" in message and "load_verify_locations" in message


def test_expired_certificate_names_the_date(expired_server: str, tls_certs: Any) -> None:
    message = tls_failure(expired_server, ssl_context=tls_certs.client_context())
    assert f"localhost:{port_of(expired_server)}" in message
    assert "expired on Jan  1 00:00:00 2020 GMT" in message
    assert "clock" in message


@pytest.mark.parametrize("http2", [True, False])
def test_hostname_mismatch_names_the_certificate_names(websockets_tls_server: str,
                                                       tls_certs: Any, http2: bool) -> None:
    message = tls_failure(websockets_tls_server, ssl_context=tls_certs.client_context(),
                          server_hostname="wrong.example", http2=HTTP2Settings(enabled=http2))
    assert "it is for localhost, 127.0.0.1, ::1, not 'wrong.example'." in message, message
    assert "server_hostname" in message


def test_plain_server_behind_wss(websockets_server: str, tls_certs: Any) -> None:
    url = websockets_server.replace("ws://", "wss://")
    message = tls_failure(url, ssl_context=tls_certs.client_context())
    assert f"127.0.0.1:{port_of(url)}" in message and "does not speak TLS" in message


def test_close_ends_the_certificate_read_at_once(tls_certs: Any) -> None:
    """After a failed verification blockws reads the certificate over a second connection;
    a server that never answers that one (here: accepted and left silent) holds it up to
    PROBE_TIMEOUT, unless the socket is closed, which ends it at once."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tls_certs.certfile, tls_certs.keyfile)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    probed = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        first, _ = listener.accept()
        with contextlib.suppress(OSError), server_ctx.wrap_socket(first, server_side=True):
            pass  # the client rejects the certificate
        first.close()
        second, _ = listener.accept()
        held.append(second)  # never answered
        probed.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    rec = Recorder()
    ws = blockws.WebSocket(f"wss://localhost:{port}/", http2=False, **rec.callbacks(),
                           ssl_context=blockws.tls.build_default_context({}))
    try:
        ws.open()
        assert probed.wait(TIMEOUT)
        started = time.monotonic()
        ws.close()
        assert rec.wait_closed(ws) == (1006, "")
        assert time.monotonic() - started < blockws.tls.PROBE_TIMEOUT / 2
    finally:
        listener.close()
        thread.join(TIMEOUT)
        for sock in held:
            sock.close()
