"""The small HTTP server behind a metrics endpoint (a server's own, and the supervisor's)."""

from __future__ import annotations

import socket
import socketserver
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

__all__ = ["bind_http"]


def bind_http(host: str, port: int, app: Any) -> WSGIServer:
    """A WSGI server for `app` bound to host:port (0 picks a free port); it answers
    once its `serve_forever` runs. `host` may be in gRPC's form of an IPv6 address."""
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_class = type("_MetricsServer", (_HTTPServer,), {"address_family": family})
    return make_server(host, port, app, server_class, _QuietHandler)


class _HTTPServer(socketserver.ThreadingMixIn, WSGIServer):
    """A thread per scrape: a slow scraper never holds up another."""

    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer's own server_bind looks up the host's fully qualified name,
        # a reverse DNS query that can take seconds where DNS is unreachable.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])
        self.setup_environ()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """No line per scrape on stderr: Prometheus scrapes every few seconds."""
