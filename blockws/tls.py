"""TLS: the default trust, ALPN set per attempt, and failures that say what to do.

**Default trust.** :func:`default_context` is the context a ``wss://`` socket
uses when it is given no ``ssl_context``: certificate and hostname checks on
(``ssl.create_default_context``), trusting

* the operating system's store (``load_default_certs()``: on Linux OpenSSL's
  default paths, on Windows the system stores, ...);
* certifi's bundle, so a machine with an empty or outdated store still
  reaches public servers;
* ``SSL_CERT_FILE`` (a PEM file) and ``SSL_CERT_DIR`` (a hashed directory)
  when they are set, as ``openssl``, curl, websocket-client and websockets
  do (OpenSSL reads them for its default paths on some builds only, so they
  are loaded here explicitly);

and ``SSLKEYLOGFILE``, when set, names the file TLS secrets are appended to
(NSS key log format), so a capture can be decrypted in Wireshark. The
context is built once per process, on first use, from the environment as it
is then. Building it costs 60-80 ms of CPU: the system store and certifi's
bundle take 25-40 ms each (about 140 CA certificates apiece), three times a
context with certifi's bundle alone (measured with Python 3.11 and OpenSSL 3.0
on a 2-core Linux VM: ``python -c "import time, blockws.tls as t;
c = time.process_time(); t.build_default_context(); print(time.process_time() - c)"``;
wall time was 140-280 ms there, with other work competing for the cores).
The first ``wss://`` socket's connecting thread pays it, within its
``open_timeout``; later sockets pay nothing, and ``send()`` and ``update()``
never do.

**ALPN per attempt.** Python sets the ALPN list on a context, not on one
connection, yet an HTTP/2 attempt must offer ``h2, http/1.1`` and the HTTP/1.1
fallback ``http/1.1`` alone (a server that supports both picks h2 whenever it
is offered, and HTTP/1.1 cannot be spoken after that). As httpcore does,
:func:`start_bio` sets the list on the context used -- blockws's or the
caller's -- for each connection attempt. OpenSSL copies the list into the
connection when it is created, so :func:`start_bio` holds a process-wide lock
from ``set_alpn_protocols`` until the connection exists (microseconds, no
I/O): blockws's own connects on other threads cannot change it in between.
The caller's context keeps the last list blockws set; code outside blockws
that uses the same context at the same moment is not guarded.

**Failures.** :func:`handshake` raises :class:`~blockws.exceptions.TLSError`
naming the host and port and what to do: the issuer that is not trusted,
the date a certificate expired, or the names it holds when they do not match.
Those details need the server's certificate, which a failed verification
does not keep, so after such a failure blockws connects once more without
verification, only to read the certificate (bounded by the time left to
open, at most :data:`PROBE_TIMEOUT`), and sends nothing on it.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any, Callable

import certifi

from .exceptions import TLSError
from .log import logger

__all__ = [
    "default_context",
    "build_default_context",
    "create_default_context",
    "start_bio",
    "handshake",
    "HTTP2_ALPN",
    "HTTP1_ALPN",
    "PROBE_TIMEOUT",
]

#: ALPN offered by an HTTP/2 attempt, and by an HTTP/1.1 connection.
HTTP2_ALPN = ("h2", "http/1.1")
HTTP1_ALPN = ("http/1.1",)
#: Longest wait for the certificate-reading connection after a verification failure.
PROBE_TIMEOUT = 3.0

_default: ssl.SSLContext | None = None
_default_lock = threading.Lock()
#: Held from set_alpn_protocols() until OpenSSL has copied the list (see the docstring).
_alpn_lock = threading.Lock()

# OpenSSL's X509_V_ERR_* codes (x509_vfy.h) that get their own advice.
_UNTRUSTED = frozenset({2, 18, 19, 20, 21})  # issuer missing, self-signed, chain incomplete
_EXPIRED = 10
_NOT_YET_VALID = 9
_HOSTNAME_MISMATCH = 62
_IP_MISMATCH = 64


def build_default_context(environ: dict[str, str] | None = None) -> ssl.SSLContext:
    """A new client context with the default trust (see the module docstring).

    ``environ`` defaults to ``os.environ``. A ``SSL_CERT_FILE`` or
    ``SSL_CERT_DIR`` that cannot be loaded is logged as a warning and
    skipped: the other sources still apply.
    """
    env = os.environ if environ is None else environ
    # create_default_context() loads the system store and reads SSLKEYLOGFILE.
    ctx = ssl.create_default_context()
    ctx.load_verify_locations(cafile=certifi.where())
    cafile = env.get("SSL_CERT_FILE")
    if cafile:
        try:
            ctx.load_verify_locations(cafile=cafile)
        except (OSError, ssl.SSLError) as exc:
            logger.warning("SSL_CERT_FILE=%s not loaded: %s", cafile, exc)
    capath = env.get("SSL_CERT_DIR")
    if capath:
        # OpenSSL's convention is a list of directories (os.pathsep between them).
        for directory in capath.split(os.pathsep):
            if not directory:
                continue
            if os.path.isdir(directory):
                ctx.load_verify_locations(capath=directory)
            else:
                logger.warning("SSL_CERT_DIR entry %s is not a directory: skipped", directory)
    keylog = env.get("SSLKEYLOGFILE")
    if keylog and environ is not None:
        ctx.keylog_filename = keylog  # os.environ's was set by create_default_context
    return ctx


def create_default_context() -> ssl.SSLContext:
    """A new context with blockws's default trust, for you to change.

    For adding to the default rather than replacing it, e.g. a client
    certificate for mutual TLS::

        ctx = blockws.create_default_context()
        ctx.load_cert_chain("client.pem", "client.key")
        ws = blockws.WebSocket("wss://example.com/", ssl_context=ctx)

    Each call builds a new context (60-80 ms of CPU, see the module
    docstring): build one and share it between sockets.
    """
    return build_default_context()


def default_context() -> ssl.SSLContext:
    """The process-wide default context, built on first use (see the module docstring).

    Thread-safe; the first caller pays the build cost, later ones none.
    """
    global _default
    with _default_lock:
        if _default is None:
            _default = build_default_context()
        return _default


def start_bio(
    ctx: ssl.SSLContext,
    incoming: ssl.MemoryBIO,
    outgoing: ssl.MemoryBIO,
    server_hostname: str,
    alpn: Sequence[str],
) -> ssl.SSLObject:
    """A TLS client over memory buffers offering ``alpn``; no I/O yet
    (:class:`blockws.transport.TLSTransport` runs it).

    The list is set on ``ctx`` under the ALPN lock, which is held until the
    connection has its own copy.
    """
    with _alpn_lock:
        ctx.set_alpn_protocols(list(alpn))
        return ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)


def handshake(
    run: Callable[[], None],
    server_hostname: str,
    host: str,
    port: int,
    *,
    reconnect: Callable[[float], socket.socket] | None = None,
    time_left: float | None = None,
) -> None:
    """Run a TLS handshake (``run()``, bounded by its caller) for ``server_hostname``.

    A failure raises :class:`~blockws.exceptions.TLSError` (or lets a
    timeout or connection error through, for the caller to map) with the
    host, the port and advice. ``reconnect(timeout)`` opens a new plain
    connection to the same server, for reading its certificate after a
    verification failure (see the module docstring). ``time_left``, the
    seconds left to open when the handshake starts, bounds the handshake and
    that read together: when the handshake used it all, nothing is read and
    the message lacks the details. Shutting down the socket ``reconnect``
    returned (an abort from another thread) ends that read at once, with the
    same result.
    """
    started = time.monotonic()
    try:
        run()
    except ssl.SSLCertVerificationError as exc:
        left = None if time_left is None else time_left - (time.monotonic() - started)
        cert = _read_certificate(server_hostname, reconnect, left)
        raise TLSError(verification_message(exc, host, port, server_hostname, cert)) from exc
    except ssl.SSLError as exc:
        raise TLSError(handshake_message(exc, host, port)) from exc


def verification_message(
    exc: ssl.SSLCertVerificationError,
    host: str,
    port: int,
    server_hostname: str | None,
    cert: dict[str, Any] | None,
) -> str:
    """What a failed certificate verification means, and what to do about it.

    ``cert`` is the server's certificate as ``SSLSocket.getpeercert()``
    returns it, or ``None`` when it could not be read.
    """
    where = f"{host}:{port}"
    code = exc.verify_code
    verify_message = (exc.verify_message or str(exc)).rstrip(".")
    head = f"TLS certificate of {where} rejected: {verify_message}"
    if code in _UNTRUSTED:
        issuer = _name(cert, "issuer") if cert else None
        who = f"Its issuer {issuer!r}" if issuer else "Its issuer"
        return (
            f"{head}. {who} is not a CA this client trusts (trusted: certifi's "
            "bundle, the system store, SSL_CERT_FILE/SSL_CERT_DIR). If the server uses a "
            "private CA, set SSL_CERT_FILE=/path/to/ca.pem or pass ssl_context= a context that "
            "loaded it (ctx.load_verify_locations('ca.pem')); if the server sends an "
            "incomplete chain, fix the server's certificate file"
        )
    if code == _EXPIRED:
        after = cert.get("notAfter") if cert else None
        when = f" on {after}" if after else ""
        return (
            f"{head}: it expired{when} (this machine's clock says {_now()}). The server must "
            "renew its certificate; if the date above is in the future, fix this machine's "
            "clock"
        )
    if code == _NOT_YET_VALID:
        before = cert.get("notBefore") if cert else None
        when = f" before {before}" if before else " yet"
        return (
            f"{head}: it is not valid{when} (this machine's clock says {_now()}): check "
            "this machine's clock"
        )
    if code in (_HOSTNAME_MISMATCH, _IP_MISMATCH):
        names = _names(cert) if cert else []
        held = f"it is for {', '.join(names)}" if names else "it is for other names"
        asked = server_hostname or host
        return (
            f"{head}: {held}, not {asked!r}. Connect with a name the certificate holds, or "
            "pass server_hostname= one of them (the name checked, and sent as SNI)"
        )
    return f"{head} (OpenSSL verify code {code})"


def handshake_message(exc: ssl.SSLError, host: str, port: int) -> str:
    """What a TLS handshake failure other than verification means."""
    where = f"{host}:{port}"
    reason = exc.reason or ""
    text = f"TLS handshake with {where} failed: {exc.reason or exc}"
    if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG"):
        return f"{text}. The server does not speak TLS there: is it a ws:// server?"
    if reason == "UNEXPECTED_EOF_WHILE_READING" or isinstance(exc, ssl.SSLEOFError):
        return (
            f"{text}: the server closed the connection during the handshake. A server that "
            "does not speak TLS there (a ws:// server) does this, and so may one that "
            "requires a client certificate (pass ssl_context= a context that loaded it: "
            "ctx.load_cert_chain('client.pem', 'client.key')) or accepts no TLS version or "
            "cipher this client offers"
        )
    if "CERTIFICATE_REQUIRED" in reason or "HANDSHAKE_FAILURE" in reason:
        return (
            f"{text}. If the server requires a client certificate, pass ssl_context= a context "
            "that loaded it (ctx.load_cert_chain('client.pem', 'client.key'))"
        )
    if "UNSUPPORTED_PROTOCOL" in reason or "PROTOCOL_VERSION" in reason:
        return f"{text}. The server and this client share no TLS version"
    return text


# -- reading the certificate after a failed verification ---------------------------


def _read_certificate(
    server_hostname: str,
    reconnect: Callable[[float], socket.socket] | None,
    time_left: float | None,
) -> dict[str, Any] | None:
    """The server's certificate, read over a new unverified connection, or ``None``."""
    if reconnect is None:
        return None
    timeout = PROBE_TIMEOUT if time_left is None else min(PROBE_TIMEOUT, time_left)
    if timeout <= 0:
        return None
    started = time.monotonic()
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname = False
    probe.verify_mode = ssl.CERT_NONE  # only to read the certificate; nothing is sent
    try:
        raw = reconnect(timeout)
        try:
            # A duplicate descriptor: ``raw`` stays usable (not detached by
            # wrap_socket), so whoever holds it can shut the probe down.
            dup = raw.dup()
            dup.settimeout(max(0.01, timeout - (time.monotonic() - started)))
            with probe.wrap_socket(dup, server_hostname=server_hostname) as conn:
                der = conn.getpeercert(binary_form=True)
        finally:
            raw.close()
    except (OSError, ValueError) as exc:
        logger.debug("could not read the certificate of the failed server: %s", exc)
        return None
    return decode_certificate(der) if der else None


def decode_certificate(der: bytes) -> dict[str, Any] | None:
    """A DER certificate as ``getpeercert()`` shows it (subject, issuer, dates, names).

    Uses CPython's certificate decoder (``ssl._ssl._test_decode_cert``, which
    reads a file); returns ``None`` where it is missing or fails.
    """
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:
        return None
    fd, path = tempfile.mkstemp(suffix=".pem")
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(ssl.DER_cert_to_PEM_cert(der))
        result = decode(path)
    except Exception:  # noqa: BLE001 - details only; the error stays clear without them
        return None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    return result if isinstance(result, dict) else None


def _fields(cert: dict[str, Any], which: str) -> dict[str, str]:
    """A distinguished name's attributes (the first of each), e.g. the issuer's."""
    fields: dict[str, str] = {}
    for rdn in cert.get(which, ()):
        for key, value in rdn:
            fields.setdefault(key, value)
    return fields


def _name(cert: dict[str, Any], which: str) -> str | None:
    """A distinguished name's common name (or organization), e.g. the issuer's."""
    fields = _fields(cert, which)
    name = fields.get("commonName") or fields.get("organizationName")
    if name and fields.get("organizationName") and fields["organizationName"] != name:
        return f"{name} ({fields['organizationName']})"
    return name


def _names(cert: dict[str, Any]) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for."""
    alt = cert.get("subjectAltName", ())
    names = [_address(value) if kind == "IP Address" else value
             for kind, value in alt if kind in ("DNS", "IP Address")]
    if not names:  # an old certificate: its common name is the name (RFC 6125 section 6.4.4)
        common = _fields(cert, "subject").get("commonName")
        names = [common] if common else []
    return names


def _address(text: str) -> str:
    """An IP address as people write it (OpenSSL spells IPv6 out in full)."""
    try:
        return ipaddress.ip_address(text.strip()).compressed
    except ValueError:
        return text


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%b %d %H:%M:%S %Y GMT")
