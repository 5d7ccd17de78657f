"""TLS at the HTTP boundary: the ssl contexts of hq-server, of clients and of workers, and
the one sentence a failed TLS connection is reported with.

Clients verify the server's certificate by default (the system's CAs, plus a private CA
from ``tls_ca`` or ``$HQ_TLS_CA``); a server given a CA of its own (``--tls-ca``)
requires and verifies client certificates (mutual TLS).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import Callable
from urllib.parse import urlsplit

from . import protocol
from .errors import TLSError

__all__ = ["client_context", "describe_failure", "refusal", "server_context", "speaks_tls"]

PROBE_TIMEOUT = 2.0  # seconds a probe for TLS on a plaintext URL's port may take


def _load(what: str, load: Callable[..., None], *paths: str) -> None:
    try:
        load(*paths)
    except (OSError, ssl.SSLError) as e:
        raise TLSError(f"cannot load the TLS {what} from {', '.join(paths)}: {e}") from None


def client_context(
    ca: str | None = None, cert: str | None = None, key: str | None = None
) -> ssl.SSLContext:
    """The context a client or worker connects to an ``https://`` server with: the
    certificate verified (system CAs plus ``ca``, default ``$HQ_TLS_CA``), and a client
    certificate ``cert``/``key`` (default ``$HQ_TLS_CERT``/``$HQ_TLS_KEY``) for a server
    that requires one. Raises :class:`TLSError` naming a file that cannot be loaded."""
    ca = ca or os.environ.get(protocol.ENV_TLS_CA) or None
    cert = cert or os.environ.get(protocol.ENV_TLS_CERT) or None
    key = key or os.environ.get(protocol.ENV_TLS_KEY) or None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca:
        _load("CA", context.load_verify_locations, ca)
    if key and not cert:
        raise TLSError(f"a TLS client key ({key}) needs its certificate: set HQ_TLS_CERT too")
    if cert:
        _load("client certificate", context.load_cert_chain, cert, *([key] if key else []))
    return context


def server_context(cert: str, key: str, ca: str | None = None) -> ssl.SSLContext:
    """hq-server's context: its certificate chain ``cert`` and ``key``; with ``ca``, every
    client must present a certificate signed by that CA (mutual TLS)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load("server certificate", context.load_cert_chain, cert, key)
    if ca:
        _load("client CA", context.load_verify_locations, ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def describe_failure(url: str, error: BaseException) -> str:
    """The one sentence for a TLS connection to ``url`` that failed with ``error``."""
    reason = getattr(error, "reason", None) or str(error)
    text = str(error).lower()
    if isinstance(error, ssl.SSLCertVerificationError) or "certificate verify failed" in text:
        detail = getattr(error, "verify_message", None) or reason
        return (
            f"the server at {url} presented a TLS certificate this client does not trust "
            f"({detail}): pass the CA that signed it (tls_ca=..., --tls-ca or HQ_TLS_CA)"
        )
    if "wrong version number" in text or "record layer failure" in text or "packet" in text:
        return (
            f"the server at {url} does not speak TLS ({reason}): use an http:// URL, or "
            "start hq-server with --tls-cert and --tls-key"
        )
    if "certificate required" in text or "handshake failure" in text or "alert" in text:
        return (
            f"the server at {url} refused this client's TLS connection ({reason}): it "
            "requires a client certificate signed by its CA (tls_cert=/tls_key=, "
            "--tls-cert/--tls-key or HQ_TLS_CERT/HQ_TLS_KEY)"
        )
    return f"TLS connection to the server at {url} failed: {reason}"


async def speaks_tls(url: str) -> bool:
    """Whether the port of the plaintext ``url`` answers a TLS handshake (a client that
    used http:// for an https:// server). Certificates are not checked: this only asks
    which protocol the port speaks, and sends nothing else."""
    parts = urlsplit(url)
    if parts.hostname is None:
        return False
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            _, writer = await asyncio.open_connection(parts.hostname, parts.port or 80, ssl=context)
    except (OSError, TimeoutError, ssl.SSLError):
        return False
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return True


async def refusal(url: str, context: ssl.SSLContext) -> str | None:
    """Why the ``https://`` server at ``url`` refuses this client's TLS connections, if
    it does: the sentence to raise, or None if it answers (or is simply not there).

    A server that requires a client certificate refuses one only after the client's
    handshake is done (TLS 1.3), and Python's servers close the connection without
    sending the alert: the client sees the server hang up. This asks once more (a
    ``HEAD`` of the health route, which every hq-server answers) and tells a connection
    closed unanswered right after a good handshake from a server that is away."""
    parts = urlsplit(url)
    if parts.hostname is None:
        return None
    request = f"HEAD {protocol.HEALTH} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n"
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            reader, writer = await asyncio.open_connection(
                parts.hostname, parts.port or 443, ssl=context
            )
            try:
                writer.write(request.encode())
                await writer.drain()
                answer = await reader.read(1)
            except ConnectionResetError:
                # Our request still unread in the server's buffer when it closed: the kernel
                # resets rather than closes (a few % of refusals), the same refusal.
                answer = b""
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
    except ssl.SSLError as e:
        return describe_failure(url, e)
    except (OSError, TimeoutError):
        return None
    if answer:
        return None
    return (
        f"the server at {url} closed the TLS connection without answering, right after "
        "the handshake: it requires a client certificate signed by its CA, and this "
        "client presented none it accepts (tls_cert=/tls_key=, --tls-cert/--tls-key or "
        "HQ_TLS_CERT/HQ_TLS_KEY)"
    )
