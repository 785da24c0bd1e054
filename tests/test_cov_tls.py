"""TLS failures (blockws/tls.py) that tests/test_tls.py does not reach: each rejected
certificate and refused handshake says what it was, with the certificate's details where
they help; and the default context's environment (SSL_CERT_DIR lists, SSLKEYLOGFILE).

Servers are Python TLS servers on raw sockets (tests/faultserver.py) configured to fail in
one way each: a certificate not yet valid, one without subjectAltName issued by a CA whose
name has a common name and an organization (made with ``cryptography``), a client
certificate required over TLS 1.2, a TLS version the client lacks, a rejected SNI name.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from connectproxy import ConnectProxy
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from faultserver import FaultServer, Peer

import blockws
import blockws.tls
from blockws.deadline import Deadline
from blockws.exceptions import TLSError
from blockws.transport import TCPTransport, TLSTransport

pytestmark = pytest.mark.timeout(30)

TIMEOUT = 10.0


@contextlib.contextmanager
def tls_server(ctx: ssl.SSLContext) -> Iterator[int]:
    """A server that runs the TLS handshake with ``ctx`` on every connection (failing as
    ``ctx`` makes it) and then reads until the client leaves; yields its port."""

    def handler(peer: Peer) -> None:
        peer.sock = ctx.wrap_socket(peer.sock, server_side=True)
        peer.drain_forever()

    with FaultServer(handler) as server:
        yield server.port


def server_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certfile, keyfile)
    return ctx


def tls_failure(port: int, **options: Any) -> str:
    """The message of the TLSError that connecting to ``wss://localhost:port`` raises."""
    with pytest.raises(TLSError) as info:
        blockws.connect(f"wss://localhost:{port}/", timeout=TIMEOUT, **options)
    assert isinstance(info.value.__cause__, ssl.SSLError), repr(info.value.__cause__)
    return str(info.value)


# -- certificates made with cryptography ------------------------------------------------------


@dataclass
class Chain:
    cafile: str  # the CA, PEM
    certfile: str  # the server's certificate, then the CA's
    keyfile: str


def _name(common: str, organization: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization)])


@pytest.fixture(scope="module")
def cn_only_chain(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    """A CA named "Blockws Test Root" of "Example Labs", and a certificate for localhost
    that names it only in its subject's common name (no subjectAltName), as old
    certificates do."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("Blockws Test Root", "Example Labs")
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                            False, False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                              critical=False)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("localhost", "Old Style Ltd"))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory = tmp_path_factory.mktemp("cn-only")
    pem = serialization.Encoding.PEM
    ca_pem = ca_cert.public_bytes(pem)
    (directory / "ca.pem").write_bytes(ca_pem)
    (directory / "cert.pem").write_bytes(cert.public_bytes(pem) + ca_pem)
    (directory / "key.pem").write_bytes(key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return Chain(str(directory / "ca.pem"), str(directory / "cert.pem"),
                 str(directory / "key.pem"))


def test_issuer_named_with_its_organization(cn_only_chain: Chain) -> None:
    with tls_server(server_context(cn_only_chain.certfile, cn_only_chain.keyfile)) as port:
        message = tls_failure(port, ssl_context=blockws.tls.build_default_context({}))
    assert f"TLS certificate of localhost:{port} rejected: " in message
    assert "Its issuer 'Blockws Test Root (Example Labs)' is not a CA this client trusts" \
        in message, message


def test_certificate_without_alt_names_names_its_common_name(cn_only_chain: Chain) -> None:
    """Without subjectAltName the names a certificate is for are its common name."""
    ctx = ssl.create_default_context(cafile=cn_only_chain.cafile)
    with tls_server(server_context(cn_only_chain.certfile, cn_only_chain.keyfile)) as port:
        message = tls_failure(port, ssl_context=ctx, server_hostname="wrong.example")
    assert "it is for localhost, not 'wrong.example'." in message, message


# -- certificate failures, over the network ---------------------------------------------------


def test_certificate_not_yet_valid_names_the_date(tls_certs: Any,
                                                  tmp_path: Path) -> None:
    cert = tls_certs.ca.issue_cert(
        "localhost",
        not_before=datetime.datetime(2090, 1, 1, tzinfo=datetime.timezone.utc),
        not_after=datetime.datetime(2091, 1, 1, tzinfo=datetime.timezone.utc))
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_pem.write_to_path(str(keyfile))
    for i, pem in enumerate(cert.cert_chain_pems):
        pem.write_to_path(str(certfile), append=i > 0)
    with tls_server(server_context(str(certfile), str(keyfile))) as port:
        message = tls_failure(port, ssl_context=tls_certs.client_context())
    assert f"TLS certificate of localhost:{port} rejected: certificate is not yet valid: " \
        "it is not valid before Jan  1 00:00:00 2090 GMT (this machine's clock says " \
        in message, message
    assert message.endswith("): check this machine's clock"), message


def test_other_verification_failures_give_the_openssl_code(tls_certs: Any) -> None:
    """A failure without advice of its own (here: CRL checking turned on, no CRL loaded)
    shows OpenSSL's text and code."""
    ctx = tls_certs.client_context()
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    with tls_server(server_context(tls_certs.certfile, tls_certs.keyfile)) as port:
        message = tls_failure(port, ssl_context=ctx)
    assert message == (f"TLS certificate of localhost:{port} rejected: "
                       "unable to get certificate CRL (OpenSSL verify code 3)")


def test_untrusted_server_through_a_proxy(tls_certs: Any) -> None:
    """Through a proxy the certificate is not read again (that would take a second
    tunnel): the advice comes without the issuer's name."""
    with tls_server(server_context(tls_certs.certfile, tls_certs.keyfile)) as port, \
            ConnectProxy() as proxy:
        message = tls_failure(port, proxy=proxy.url,
                              ssl_context=blockws.tls.build_default_context({}))
        assert proxy.requests[0] == f"CONNECT localhost:{port} HTTP/1.1"
    assert "Its issuer is not a CA this client trusts" in message, message
    assert "SSL_CERT_FILE=/path/to/ca.pem" in message


def test_no_certificate_read_when_the_handshake_used_the_time_left(tls_certs: Any) -> None:
    """The certificate is read again only within the time left to open: the time the
    handshake took counts (it used to be ignored, so a slow server's failed handshake
    was followed by a read bounded by the time left before that handshake)."""
    ctx = server_context(tls_certs.certfile, tls_certs.keyfile)
    accepted: list[Peer] = []

    def handler(peer: Peer) -> None:
        accepted.append(peer)
        if len(accepted) <= 2:  # the two handshakes below, not the certificate read
            time.sleep(0.2)  # the fault: a server that takes 0.2 s to answer
        peer.sock = ctx.wrap_socket(peer.sock, server_side=True)
        peer.drain_forever()

    untrusted = blockws.tls.build_default_context({})
    reads: list[float] = []
    with FaultServer(handler) as server:

        def reconnect(timeout: float) -> socket.socket:
            reads.append(timeout)
            return socket.create_connection(("127.0.0.1", server.port), timeout)

        for time_left, read in ((0.1, False), (TIMEOUT, True)):
            reads.clear()
            sock = socket.create_connection(("127.0.0.1", server.port), TIMEOUT)
            tls = TLSTransport(TCPTransport(sock), untrusted, "localhost")
            deadline = Deadline(TIMEOUT)
            with contextlib.closing(tls), pytest.raises(TLSError) as info:
                blockws.tls.handshake(functools.partial(tls.handshake, deadline), "localhost",
                                      "localhost", server.port, reconnect=reconnect,
                                      time_left=time_left)
            message = str(info.value)
            assert "is not a CA this client trusts" in message
            if read:
                assert reads == [blockws.tls.PROBE_TIMEOUT]
                assert "Its issuer 'trustme" in message, message
            else:
                assert reads == []
                assert "Its issuer is not" in message, message


# -- handshake failures ------------------------------------------------------------------------


def test_http_server_behind_wss() -> None:
    """A server that answers the ClientHello with HTTP text."""
    def handler(peer: Peer) -> None:
        peer.sock.recv(4096)
        peer.send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    with FaultServer(handler) as server:
        message = tls_failure(server.port, http2=False)
    assert message == (f"TLS handshake with localhost:{server.port} failed: "
                       "WRONG_VERSION_NUMBER. The server does not speak TLS there: is it a "
                       "ws:// server?")


def test_client_certificate_required_over_tls12(tls_certs: Any) -> None:
    """Over TLS 1.2 a server that wants a client certificate refuses the handshake with
    an alert (over TLS 1.3 only after it: tests/test_tls.py)."""
    ctx = server_context(tls_certs.certfile, tls_certs.keyfile)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(tls_certs.cafile)
    client = tls_certs.client_context()
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    with tls_server(ctx) as port:
        message = tls_failure(port, ssl_context=client)
    assert message.startswith(f"TLS handshake with localhost:{port} failed: "
                              "SSLV3_ALERT_HANDSHAKE_FAILURE. If the server requires a client "
                              "certificate, pass ssl_context= a context that loaded it"), message


@pytest.mark.parametrize("side", ["server", "client"])
def test_no_tls_version_in_common(tls_certs: Any, side: str) -> None:
    """A server that speaks only TLS 1.3 to a client limited to 1.2, or the reverse."""
    ctx = server_context(tls_certs.certfile, tls_certs.keyfile)
    client = tls_certs.client_context()
    if side == "server":
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        client.maximum_version = ssl.TLSVersion.TLSv1_2
    else:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        client.minimum_version = ssl.TLSVersion.TLSv1_3
    with tls_server(ctx) as port:
        message = tls_failure(port, ssl_context=client)
    assert message.startswith(f"TLS handshake with localhost:{port} failed: "), message
    assert message.endswith(". The server and this client share no TLS version"), message


def test_other_handshake_alerts_are_named(tls_certs: Any) -> None:
    """A server that rejects the name sent as SNI (nginx's ssl_reject_handshake does) with
    an unrecognized_name alert: the message names the alert, without advice."""
    ctx = server_context(tls_certs.certfile, tls_certs.keyfile)
    ctx.sni_callback = lambda sock, name, context: ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
    with tls_server(ctx) as port:
        message = tls_failure(port, ssl_context=tls_certs.client_context(), http2=False)
    assert message == f"TLS handshake with localhost:{port} failed: TLSV1_UNRECOGNIZED_NAME"


# -- the default context's environment ---------------------------------------------------------


@pytest.mark.unit
def test_empty_ssl_cert_dir_entries_are_skipped_quietly(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    """``SSL_CERT_DIR=:dir:`` (an empty entry at either end, as shell scripts that append
    make) loads ``dir`` and warns about nothing; a missing entry still gets a warning."""
    caplog.set_level(logging.WARNING, logger="blockws")
    blockws.tls.build_default_context(
        {"SSL_CERT_DIR": f"{os.pathsep}{tmp_path}{os.pathsep}{os.pathsep}"})
    assert caplog.records == []
    blockws.tls.build_default_context(
        {"SSL_CERT_DIR": f"{os.pathsep}{tmp_path / 'missing'}"})
    assert [r.getMessage() for r in caplog.records] == [
        f"SSL_CERT_DIR entry {tmp_path / 'missing'} is not a directory: skipped"]


def test_ssl_cert_dir_list_is_trusted(websockets_tls_server: str, tls_certs: Any,
                                      tmp_path: Path) -> None:
    """A list of directories (an empty one, one without the CA, the hashed one) trusts
    the CA in any of them."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to name a hashed CA directory")
    subject_hash = subprocess.run([openssl, "x509", "-hash", "-noout", "-in", tls_certs.cafile],
                                  capture_output=True, text=True, check=True,
                                  timeout=TIMEOUT).stdout.strip()
    hashed, other = tmp_path / "hashed", tmp_path / "other"
    hashed.mkdir()
    other.mkdir()
    shutil.copy(tls_certs.cafile, hashed / f"{subject_hash}.0")
    ctx = blockws.tls.build_default_context(
        {"SSL_CERT_DIR": os.pathsep.join(["", str(other), str(hashed)])})
    with blockws.connect(websockets_tls_server, timeout=TIMEOUT, ssl_context=ctx) as ws:
        ws.send("trusted")
        assert ws.receive(TIMEOUT) == "trusted"


def test_keylog_file_from_the_environment_given(websockets_tls_server: str, tls_certs: Any,
                                                tmp_path: Path) -> None:
    """``build_default_context(environ)`` takes SSLKEYLOGFILE from ``environ`` too (only
    ``os.environ``'s is read by Python itself)."""
    keylog = tmp_path / "keys.log"
    ctx = blockws.tls.build_default_context(
        {"SSL_CERT_FILE": tls_certs.cafile, "SSLKEYLOGFILE": str(keylog)})
    assert ctx.keylog_filename == str(keylog)
    with blockws.connect(websockets_tls_server, timeout=TIMEOUT, ssl_context=ctx) as ws:
        ws.send("logged")
        assert ws.receive(TIMEOUT) == "logged"
    secrets = keylog.read_text()
    assert "CLIENT_TRAFFIC_SECRET_0" in secrets or "CLIENT_RANDOM" in secrets, secrets[:200]


# -- reading certificates, without a network ----------------------------------------------------


def _verify_error(code: int, text: str) -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] {text}")
    exc.verify_code = code
    exc.verify_message = text
    return exc


@pytest.mark.unit
def test_undecodable_certificate_is_none() -> None:
    assert blockws.tls.decode_certificate(b"\x30\x03not a certificate") is None


@pytest.mark.unit
def test_without_cpythons_decoder_the_message_lacks_only_the_details(
        tls_certs: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``ssl._ssl._test_decode_cert`` is a private CPython function: where it is missing,
    certificates are not decoded and the advice comes without the issuer's name."""
    der = ssl.PEM_cert_to_DER_cert(tls_certs.ca.cert_pem.bytes().decode("ascii"))
    assert blockws.tls.decode_certificate(der) is not None
    monkeypatch.delattr(ssl._ssl, "_test_decode_cert")  # type: ignore[attr-defined]
    cert = blockws.tls.decode_certificate(der)
    assert cert is None
    message = blockws.tls.verification_message(
        _verify_error(20, "unable to get local issuer certificate"), "h", 443, "h", cert)
    assert message.startswith("TLS certificate of h:443 rejected: unable to get local issuer "
                              "certificate. Its issuer is not a CA this client trusts")


@pytest.mark.unit
def test_malformed_ip_address_names_are_shown_as_openssl_wrote_them() -> None:
    """getpeercert() writes an IP address entry of the wrong length as "<invalid>"; the
    other names are still listed, IPv6 compressed."""
    cert = {"subjectAltName": (("IP Address", "<invalid>"), ("DNS", "example.com"),
                               ("IP Address", "2001:DB8:0:0:0:0:0:1\n"), ("email", "a@b.c"))}
    message = blockws.tls.verification_message(
        _verify_error(62, "Hostname mismatch, certificate is not valid for 'x.example'."),
        "x.example", 443, None, cert)
    assert message.endswith("Hostname mismatch, certificate is not valid for 'x.example': it "
                            "is for <invalid>, example.com, 2001:db8::1, not 'x.example'. Connect "
                            "with a name the certificate holds, or pass server_hostname= one of "
                            "them (the name checked, and sent as SNI)"), message
