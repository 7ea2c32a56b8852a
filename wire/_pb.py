"""The one place that imports the generated protobuf modules (under private aliases)."""

from fuseport.v1 import graph_pb2 as graph
from fuseport.v1 import service_pb2 as service
from fuseport.v1 import values_pb2 as values

__all__ = ["graph", "service", "values"]
