"""TLS contexts for the broker link (MQTT over TLS, optionally mutual) and the S3 link (https).

Why one module: the bus (aiomqtt), every paho client (CLI, simulator, the stack's own checks)
and the minio client must verify the same CA and present the same client certificate, and a
missing or unreadable file must be one clear ``TLSError`` naming the config key, raised before
any connection is tried, not a traceback from inside a library.
"""

from __future__ import annotations

import functools
import os
import ssl
from pathlib import Path
from typing import Any

from services.common.config import BrokerConfig, ConfigError, S3Config


class TLSError(ConfigError):
    """A CA, certificate or key named by the configuration is missing or unusable."""


class ResumingContext(ssl.SSLContext):
    """A client context that resumes the last TLS session it was given for a server.

    Why: an executor opens a new broker connection for every instance it starts, the target
    of a migration inside the downtime, and a full mutual-TLS handshake costs about twice a
    resumed one here (OpenSSL 3: ~4.8 against ~2.5 ms). The server falls back to a full
    handshake by itself when it cannot resume (restarted, ticket expired); a resumed session
    keeps the client certificate it was made with.
    """

    def __init__(self, protocol: int = ssl.PROTOCOL_TLS_CLIENT) -> None:
        super().__init__()
        self._sessions: dict[tuple[str | None, tuple[Any, ...]], ssl.SSLSession] = {}

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        if not args and kwargs.get("session") is None:
            key = _server_key(kwargs.get("server_hostname"), sock)
            kwargs["session"] = self._sessions.get(key)
        return super().wrap_socket(sock, *args, **kwargs)

    def remember(self, sock: Any) -> None:
        """Keep ``sock``'s session (once the server sent its ticket: after the first read)."""
        session = getattr(sock, "session", None)
        if session is not None and session.has_ticket:
            key = _server_key(getattr(sock, "server_hostname", None), sock)
            self._sessions[key] = session


def _server_key(hostname: str | None, sock: Any) -> tuple[str | None, tuple[Any, ...]]:
    try:
        peer = tuple(sock.getpeername())
    except (OSError, AttributeError):
        peer = ()
    return hostname, peer


def broker_context(broker: BrokerConfig) -> ssl.SSLContext | None:
    """The client context for ``broker`` (None: plaintext MQTT).

    ``tls_ca`` empty means the system's CA store; ``tls_cert``/``tls_key`` are this process's
    certificate for a broker that requires one (mutual TLS).
    """
    if not broker.tls:
        if broker.tls_cert or broker.tls_key:
            raise TLSError("broker.tls_cert/tls_key are set but broker.tls is false")
        return None
    return client_context(
        broker.tls_ca, broker.tls_cert, broker.tls_key, keys=("broker.tls_ca", "broker.tls_cert")
    )


def s3_context(s3: S3Config) -> ssl.SSLContext | None:
    """The client context for the S3 store (None: plain http)."""
    if not s3.secure:
        if s3.ca:
            raise TLSError("s3.ca is set but s3.secure is false")
        return None
    return client_context(s3.ca, "", "", keys=("s3.ca", ""))


def urllib3_options(s3: S3Config) -> dict[str, Any]:
    """Keyword arguments for the ``urllib3.PoolManager`` of a minio client: verified https
    with ``s3.ca`` when ``s3.secure`` (pooled keep-alive connections as before)."""
    context = s3_context(s3)
    if context is None:
        return {}
    return {"cert_reqs": "CERT_REQUIRED", "ssl_context": context}


def client_context(
    ca: str, cert: str, key: str, *, keys: tuple[str, str] = ("ca", "cert")
) -> ssl.SSLContext:
    """A verifying client context (hostname checked, TLS 1.2 at least), shared by every client
    of this process that names the same files, unchanged since.

    Why shared: building one costs 50-150 ms here when it loads the system's CA store, and an
    executor opens a connection (a new ``Bus``) for every instance it starts, inside a
    migration's downtime. Contexts are safe to share between connections and threads.
    """
    return _cached_context(ca, cert, key, keys, _stamp(ca), _stamp(cert), _stamp(key))


def _stamp(path: str) -> tuple[int, int] | None:
    """What identifies a file's content for the cache (None: absent, or no file named)."""
    if not path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=32)
def _cached_context(
    ca: str, cert: str, key: str, keys: tuple[str, str], *stamps: tuple[int, int] | None
) -> ssl.SSLContext:
    ca_key, cert_key = keys
    # Not ssl.create_default_context(): with a CA file of our own it would also load the
    # system's whole store (most of the cost above) and trust it as well.
    context = ResumingContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname on
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca:
        _readable(ca, ca_key)
        try:
            context.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise TLSError(f"{ca_key} = {ca!r}: not a PEM CA certificate ({exc.reason})") from None
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert or key:
        if not (cert and key):
            raise TLSError(f"{cert_key} and its key must be given together (got only one)")
        _readable(cert, cert_key)
        _readable(key, cert_key.replace("cert", "key"))
        try:
            context.load_cert_chain(cert, key)
        except ssl.SSLError as exc:
            raise TLSError(
                f"{cert_key} = {cert!r} with key {key!r}: unusable ({exc.reason or exc})"
            ) from None
    return context


def _readable(path: str, key: str) -> None:
    try:
        Path(path).read_bytes()
    except OSError as exc:
        raise TLSError(f"{key} = {path!r}: cannot read it ({exc.strerror or exc})") from None


def is_tls_failure(text: str) -> bool:
    """Whether an error message (aiomqtt keeps only the text) is a TLS failure no retry fixes:
    a certificate that does not verify, an alert from a peer that refused ours."""
    return "[SSL" in text or "CERTIFICATE_VERIFY_FAILED" in text or "certificate" in text.lower()
