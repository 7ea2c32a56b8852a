"""fuseport and tritonclient[grpc] in one environment and one process.

Run by .ci/run in a venv where pip installed the fuseport wheel and the current
tritonclient together (tritonclient pins protobuf <7; fuseport's stubs load on
4.25 to 7). Each library makes a real call through its own generated stubs:

* fuseport: a `fuseport serve` of its own; register, Execute and Fallback through
  `fuseport.client.Client`, checked against eager torch;
* tritonclient: `InferenceServerClient` against an in-process KServe v2 server made
  from tritonclient's own stubs (fuseport does not serve that protocol yet), which
  adds one to the input: ServerLive, then ModelInfer with raw contents.

Exits non-zero (an AssertionError or the error) on any failure.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from concurrent import futures
from importlib import metadata
from pathlib import Path

import grpc
import numpy as np
import torch
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc

from fuseport.client import Client
from fuseport.wire._local import read_port_file, stop_process, wait_until_serving


def call_fuseport() -> None:
    with tempfile.TemporaryDirectory(prefix="fuseport-beside-") as tmp:
        port_file = Path(tmp) / "port"
        proc = subprocess.Popen(
            [sys.executable, "-m", "fuseport.client.cli", "serve", "--port", "0", "--port-file", str(port_file),
             "--store-dir", str(Path(tmp) / "store"), "--compile-mode", "off"],
        )  # fmt: skip
        try:
            target = f"127.0.0.1:{read_port_file(proc, port_file, 'fuseport serve')}"
            wait_until_serving(target)
            with Client(target, timeout=60) as c:
                key = c.register(lambda x, y: torch.tanh(x * y) + 1, [torch.randn(5), torch.randn(5)])
                x, y = torch.randn(7), torch.randn(7)
                for out in (c.execute(key, [x, y]), c.fallback(key, [x, y])):
                    torch.testing.assert_close(out[0], torch.tanh(x * y) + 1)
        finally:
            assert stop_process(proc) == 0, "fuseport serve did not exit cleanly"
    print(f"fuseport: kernel {key} ran through Execute and Fallback")


class AddOne(service_pb2_grpc.GRPCInferenceServiceServicer):
    def ServerLive(self, request, context):  # noqa: N802 - the protocol's name
        return service_pb2.ServerLiveResponse(live=True)

    def ModelInfer(self, request, context):  # noqa: N802
        x = np.frombuffer(request.raw_input_contents[0], dtype=np.float32)
        out = service_pb2.ModelInferResponse(model_name=request.model_name, id=request.id)
        tensor = out.outputs.add(name="y", datatype="FP32")
        tensor.shape.extend(request.inputs[0].shape)
        out.raw_output_contents.append((x + 1).astype(np.float32).tobytes())
        return out


def call_tritonclient() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(AddOne(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.is_server_live()
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        inp = triton.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("add_one", [inp], outputs=[triton.InferRequestedOutput("y")])
        np.testing.assert_array_equal(result.as_numpy("y"), x + 1)
        client.close()
    finally:
        server.stop(None)
    print("tritonclient: ServerLive and ModelInfer answered")


if __name__ == "__main__":
    versions = {d: metadata.version(d) for d in ("fuseport", "tritonclient", "protobuf", "grpcio", "torch")}
    print("versions:", ", ".join(f"{d} {v}" for d, v in versions.items()))
    call_fuseport()
    call_tritonclient()
