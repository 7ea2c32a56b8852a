"""The fuseport server: a gRPC service that holds kernel graphs by key and runs them.

from fuseport.server import Settings, create_server, serve
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fuseport.wire._lazy import lazy_exports

if TYPE_CHECKING:
    from fuseport.server.app import Server, create_server, serve
    from fuseport.server.calls import Result
    from fuseport.server.core import Core
    from fuseport.server.security import Security
    from fuseport.server.settings import Settings

__all__ = ["Core", "Result", "Security", "Server", "Settings", "create_server", "serve"]

__getattr__ = lazy_exports(
    __name__,
    {
        "Core": "fuseport.server.core",
        "Result": "fuseport.server.calls",
        "Security": "fuseport.server.security",
        "Server": "fuseport.server.app",
        "create_server": "fuseport.server.app",
        "serve": "fuseport.server.app",
        "Settings": "fuseport.server.settings",
    },
)
