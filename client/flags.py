"""How a command reaches a server: the target and TLS flags, and the environment variables behind them.

Shared by the `fuseport` command (fuseport.cli) and `fuseport bench`, which sit
above the client library.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from fuseport.wire.security import TOKEN_ENV

__all__ = [
    "CLIENT_CERT_ENV",
    "CLIENT_ENV",
    "CLIENT_KEY_ENV",
    "SERVER_NAME_ENV",
    "TARGET_ENV",
    "TLS_CA_ENV",
    "TOKEN_ENV",
    "add_target_flags",
    "add_tls_flags",
    "client_kwargs",
    "default_target",
]

TARGET_ENV = "FUSEPORT_TARGET"
# How the client commands reach a TLS server. Not FUSEPORT_TLS_CERT/KEY: those
# are the server's own certificate, and both may be set in one container.
TLS_CA_ENV = "FUSEPORT_TLS_CA"
CLIENT_CERT_ENV = "FUSEPORT_CLIENT_TLS_CERT"
CLIENT_KEY_ENV = "FUSEPORT_CLIENT_TLS_KEY"
SERVER_NAME_ENV = "FUSEPORT_TLS_SERVER_NAME"
# Every variable the client commands read (the server's are its settings').
CLIENT_ENV = (TARGET_ENV, TLS_CA_ENV, CLIENT_CERT_ENV, CLIENT_KEY_ENV, SERVER_NAME_ENV, TOKEN_ENV)


def default_target() -> str:
    return os.environ.get(TARGET_ENV) or "127.0.0.1:50051"


def add_tls_flags(p: argparse.ArgumentParser) -> None:
    """--tls-ca/--tls-cert/--tls-key/--tls-server-name."""
    p.add_argument(
        "--tls-ca",
        default=None,
        metavar="PEM",
        help=f"speak TLS, trusting this CA bundle for the server's certificate (default: ${TLS_CA_ENV}; "
        "with only --tls-cert, the system's roots)",
    )
    p.add_argument(
        "--tls-cert",
        default=None,
        metavar="PEM",
        help=f"client certificate for a server that requires one (default: ${CLIENT_CERT_ENV})",
    )
    p.add_argument(
        "--tls-key",
        default=None,
        metavar="PEM",
        help=f"private key of --tls-cert (default: ${CLIENT_KEY_ENV})",
    )
    p.add_argument("--tls-server-name", default=None, metavar="NAME",
                   help="name the server's certificate must carry, when the target's host is another one "
                        f"(default: ${SERVER_NAME_ENV})")  # fmt: skip


def add_target_flags(p: argparse.ArgumentParser) -> None:
    """--target, --timeout and the TLS flags of a command that calls a server."""
    p.add_argument(
        "--target",
        default=None,
        help=f"server address host:port (default: ${TARGET_ENV} or 127.0.0.1:50051)",
    )
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per call (default: 10)")
    add_tls_flags(p)


def client_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The Client's TLS arguments from the flags, else the environment. The
    token comes from $FUSEPORT_TOKEN only: a flag would show it in `ps`."""
    return {
        "tls_ca": args.tls_ca or os.environ.get(TLS_CA_ENV) or None,
        "tls_cert": args.tls_cert or os.environ.get(CLIENT_CERT_ENV) or None,
        "tls_key": args.tls_key or os.environ.get(CLIENT_KEY_ENV) or None,
        "tls_server_name": args.tls_server_name or os.environ.get(SERVER_NAME_ENV) or None,
    }
