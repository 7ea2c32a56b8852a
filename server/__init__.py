"""The fuseport server: a gRPC service that holds kernel graphs by key and runs them.

    from fuseport.server import Settings, create_server, serve
"""

from fuseport.server.app import Server, create_server, serve
from fuseport.server.core import Core, Result
from fuseport.server.settings import Settings

__all__ = ["Core", "Result", "Server", "Settings", "create_server", "serve"]
