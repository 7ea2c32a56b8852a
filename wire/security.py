"""What a caller needs to reach a guarded server: TLS channel credentials from PEM files, the bearer token.

Shared by the client, the CLI (whose health check must not import torch, so
nothing here does) and the local tooling that waits on a server's health.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

__all__ = [
    "AUTHORIZATION_KEY",
    "TOKEN_ENV",
    "bearer_metadata",
    "channel_credentials",
    "is_loopback",
    "open_channel",
    "token_from_env",
]

# The metadata key and scheme of RFC 6750, as every gRPC gateway and proxy expects them.
AUTHORIZATION_KEY = "authorization"
BEARER = "Bearer "
TOKEN_ENV = "FUSEPORT_TOKEN"


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach: 127.0.0.0/8, ::1, localhost."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name (or "", every interface): reachable from elsewhere
        return False


def _read(path: str | os.PathLike[str] | None, what: str) -> bytes | None:
    if path is None or str(path) == "":
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{what} {path}: {e.strerror or e}") from None


def channel_credentials(
    tls_ca: str | os.PathLike[str] | None = None,
    tls_cert: str | os.PathLike[str] | None = None,
    tls_key: str | os.PathLike[str] | None = None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials from PEM files, or None when none is given (plaintext).

    `tls_ca`: the CA bundle the server's certificate must chain to (None: the
    system's roots). `tls_cert` + `tls_key`: this client's certificate, for a
    server that requires one (mTLS)."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("a client certificate needs both tls_cert and tls_key")
    if tls_ca is None and tls_cert is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls_ca, "tls_ca"),
        private_key=_read(tls_key, "tls_key"),
        certificate_chain=_read(tls_cert, "tls_cert"),
    )


def token_from_env() -> str | None:
    return os.environ.get(TOKEN_ENV) or None


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries `token` (none without one)."""
    if not token:
        return ()
    if any(c.isspace() for c in token):
        # Whitespace would be cut off or refused by HTTP/2; say so here, without the token.
        raise ValueError("a token cannot contain whitespace")
    return ((AUTHORIZATION_KEY, BEARER + token),)


def open_channel(
    target: str,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, Any]] = (),
    *,
    aio: bool = False,
) -> Any:
    """A plaintext channel without credentials, a TLS one with them."""
    module: Any = grpc.aio if aio else grpc
    if credentials is None:
        return module.insecure_channel(target, options=list(options))
    return module.secure_channel(target, credentials, options=list(options))
