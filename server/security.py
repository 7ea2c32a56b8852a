"""Who may call the server: TLS credentials and bearer tokens with roles, both reloadable on SIGHUP.

The servicer knows nothing of this: `rpc.gate.Gate` asks `Access.check` before a
KernelService or KServe v2 method runs. Health and reflection are never gated (probes carry
no token). Tokens are never logged and never put in an error message.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import ssl
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from fuseport.server.settings import Settings
from fuseport.wire.errors import FuseportError, PermissionDenied, Unauthenticated
from fuseport.wire.security import AUTHORIZATION_KEY, BEARER

__all__ = ["INFERENCE_METHODS", "ROLES", "Access", "Security", "Tls", "load_tokens", "presented_token_digest"]

log = logging.getLogger(__name__)

# The KServe v2 protocol's methods (server/rpc/kserve.py): ModelInfer runs a kernel,
# as Execute does; the others only read, as Describe and List do. Every role may
# call them all; none changes what is registered.
INFERENCE_METHODS = frozenset(
    {
        "ServerLive",
        "ServerReady",
        "ServerMetadata",
        "ModelReady",
        "ModelMetadata",
        "ModelConfig",
        "ModelInfer",
        "RepositoryIndex",
    }
)

# What each role may call, by method name (KernelService's and the inference
# protocol's names do not overlap). `user` runs what is registered and
# registers kernels of its own (server/tenants.py: no other user sees them);
# only `admin` changes the shared kernels.
_STREAM_METHODS = frozenset({"ExecuteStream", "FallbackStream"})
# Register's streamed form (large graphs): whoever may call Register may call it.
_REGISTER = frozenset({"Register", "RegisterStream"})
# A caller reaches only its own handles (server/resident.py): every role may.
_HANDLE_METHODS = frozenset({"FetchHandles", "FreeHandles", "RenewLease"})
# A session carries the caller's own Execute/Fallback calls, nothing more.
_HANDLE_METHODS |= {"OpenSharedMemory"}

ROLES: Mapping[str, frozenset[str]] = {
    "admin": frozenset(
        {"Execute", "Fallback", "Describe", "List", "Unregister"}
        | _REGISTER
        | _STREAM_METHODS
        | _HANDLE_METHODS
    )
    | INFERENCE_METHODS,
    "user": frozenset({"Execute", "Fallback", "Describe", "List", "Unregister"})
    | _REGISTER
    | _STREAM_METHODS
    | _HANDLE_METHODS
    | INFERENCE_METHODS,
}


def _digest(token: str) -> bytes:
    # Tokens are compared as SHA-256 digests: equal lengths, so the comparison's
    # time says nothing about a token's length either, and the process holds no
    # token in the clear after loading.
    return hashlib.sha256(token.encode()).digest()


def load_tokens(path: Path) -> list[tuple[bytes, str]]:
    """(digest of token, role) for each `TOKEN ROLE` line of `path`.

    Blank lines and `#` comments are skipped. A malformed line is a ValueError
    naming its line number, never its content (it may hold a token)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"auth_tokens {path}: {e.strerror or e}") from None
    entries: list[tuple[bytes, str]] = []
    seen: set[bytes] = set()
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) != 2:
            raise ValueError(f"auth_tokens {path}:{number}: expected 'TOKEN ROLE', got {len(words)} words")
        token, role = words
        if role not in ROLES:
            raise ValueError(f"auth_tokens {path}:{number}: unknown role {role!r} (roles: {', '.join(ROLES)})")
        digest = _digest(token)
        if digest in seen:
            raise ValueError(f"auth_tokens {path}:{number}: the same token is listed twice")
        seen.add(digest)
        entries.append((digest, role))
    if not entries:
        # An empty file would lock everyone out; more likely a mistake than intended.
        raise ValueError(f"auth_tokens {path}: no tokens (lines of 'TOKEN ROLE')")
    return entries


def _presented(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    presented = None
    for key, value in metadata or ():
        if key == AUTHORIZATION_KEY and isinstance(value, str) and value[: len(BEARER)].lower() == BEARER.lower():
            presented = value[len(BEARER) :].strip()
    return presented or None


def presented_token_digest(metadata: Iterable[tuple[str, str | bytes]] | None) -> bytes:
    """The digest of the call's bearer token (b"" without one): part of who owns
    the call's device-resident values, so that a handle is bound to its token."""
    presented = _presented(metadata)
    return _digest(presented) if presented else b""


class Access:
    """Bearer tokens with roles, read from a file, reread by `reload`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tokens = load_tokens(path)

    def reload(self) -> str:
        self._tokens = load_tokens(self.path)  # replaced whole: a call sees the old or the new set
        return f"auth tokens from {self.path}: {self.summary()}"

    def summary(self) -> str:
        counts = {role: sum(r == role for _, r in self._tokens) for role in ROLES}
        return ", ".join(f"{n} {role}" for role, n in counts.items())

    def role_of(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
        """The role of the call's bearer token; None when it has none the server knows."""
        presented = _presented(metadata)
        return None if not presented else self._role_of_digest(_digest(presented))

    def _role_of_digest(self, digest: bytes) -> str | None:
        role = None
        # Every configured token is compared (no early exit), each in constant
        # time: how long this takes says nothing about which token nearly matched.
        for known, known_role in self._tokens:
            if hmac.compare_digest(digest, known):
                role = known_role
        return role

    def tenant_of(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> bytes:
        """The kernel namespace of the call (server/tenants.py): a `user` token's
        own (its digest), b"" (the shared one) for an admin."""
        presented = _presented(metadata)
        if not presented:
            return b""
        digest = _digest(presented)  # hashed once for both questions
        return digest if self._role_of_digest(digest) == "user" else b""

    def check(self, metadata: Iterable[tuple[str, str | bytes]] | None, method: str) -> FuseportError | None:
        """The error for a call to `method` (KernelService's or the inference protocol's), or None if it may proceed."""
        has_header = any(k == AUTHORIZATION_KEY for k, _ in metadata or ())
        role = self.role_of(metadata)
        if role is None:
            if not has_header:
                return Unauthenticated("this server needs a token: send metadata 'authorization: Bearer <token>'")
            return Unauthenticated("the token is not one this server accepts")
        if method not in ROLES[role]:
            return PermissionDenied(f"role {role!r} may not call {method}")
        return None


@dataclass(frozen=True)
class _Pem:
    cert: bytes
    key: bytes
    client_ca: bytes | None


class Tls:
    """Server TLS from PEM files. The credentials are gRPC's dynamic ones: gRPC
    asks `_fetch` at each new connection's handshake, and `reload` hands it the
    files as they are now. Connections already open keep their session."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None) -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._lock = threading.Lock()  # _fetch runs on gRPC's own threads
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._initial = self._configuration(self._read())

    def _read(self) -> _Pem:
        def read(path: Path, what: str) -> bytes:
            try:
                return path.read_bytes()
            except OSError as e:
                raise ValueError(f"{what} {path}: {e.strerror or e}") from None

        pem = _Pem(read(self.cert, "tls_cert"), read(self.key, "tls_key"),
                   None if self.client_ca is None else read(self.client_ca, "tls_client_ca"))  # fmt: skip
        # gRPC would only find a bad file at the next handshake, and then refuse
        # every connection; Python's ssl module checks that the files parse and
        # the key matches the certificate, here, while the old ones still serve.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.cert, self.key)
        except (ssl.SSLError, OSError) as e:
            raise ValueError(f"tls_cert {self.cert} / tls_key {self.key}: {e}") from None
        if self.client_ca is not None:
            try:
                context.load_verify_locations(cafile=self.client_ca)
            except (ssl.SSLError, OSError) as e:
                raise ValueError(f"tls_client_ca {self.client_ca}: {e}") from None
        return pem

    @staticmethod
    def _configuration(pem: _Pem) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(pem.key, pem.cert)], root_certificates=pem.client_ca)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # None means "unchanged" to gRPC; it must never raise here.
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self._fetch, require_client_authentication=self.client_ca is not None
        )

    def reload(self) -> str:
        configuration = self._configuration(self._read())
        with self._lock:
            self._pending = configuration
        mtls = f", client CA {self.client_ca}" if self.client_ca is not None else ""
        return f"TLS certificate {self.cert}{mtls} (new connections)"


class Security:
    """What a server's settings ask for: TLS, tokens, both or neither."""

    def __init__(self, tls: Tls | None, access: Access | None) -> None:
        self.tls = tls
        self.access = access

    @classmethod
    def load(cls, settings: Settings) -> Security:
        """Reads every file the settings name; a ValueError says which one is wrong."""
        tls = None
        if settings.tls_cert is not None and settings.tls_key is not None:
            tls = Tls(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        access = None if settings.auth_tokens is None else Access(settings.auth_tokens)
        return cls(tls, access)

    @property
    def reloadable(self) -> bool:
        return self.tls is not None or self.access is not None

    def describe(self) -> str:
        parts = []
        if self.tls is not None:
            parts.append("TLS with client certificates" if self.tls.client_ca is not None else "TLS")
        else:
            parts.append("plaintext")
        parts.append(f"tokens ({self.access.summary()})" if self.access is not None else "no tokens")
        return ", ".join(parts)

    def reload(self) -> None:
        """Rereads every file; one that is now unreadable or malformed is logged
        and the one in use stays (a typo must not take the server down)."""
        for part in (self.access, self.tls):
            if part is None:
                continue
            try:
                log.info("reloaded %s", part.reload())
            except ValueError as e:
                log.error("reload failed, keeping the previous one: %s", e)
