"""fuseport and tritonclient[grpc] in one environment: tritonclient calls a real fuseport server.

Run by .ci/run in a venv where pip installed the fuseport wheel and the current
tritonclient together (tritonclient pins protobuf <7; fuseport's stubs load on
4.25 to 7). One `fuseport serve` (a process of its own: the server's KServe
stubs and tritonclient's both define the `inference.*` protobuf names, so they
cannot share a process), then, from this process:

* fuseport's client registers a kernel under an alias and runs it through
  Execute and Fallback, checked against eager torch;
* tritonclient's `InferenceServerClient` (KServe v2 over gRPC, its own stubs)
  checks the server and the model, reads the metadata, the model configuration
  (Triton's ModelConfig, decoded by tritonclient's own model_config stubs, as
  perf_analyzer reads it) and the repository index, and infers through the alias
  and through the key in decimal, both checked against eager torch;
* importing the server's inference stubs here fails with protobuf's duplicate
  symbol error: the clash docs/guides/kserve.md describes, pinned.

Exits non-zero (an AssertionError or the error) on any failure.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from fuseport.client import Client
from fuseport.wire._local import read_port_file, stop_process, wait_until_serving

ALIAS = "tanh-mul"


def kernel(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    return torch.tanh(x * y) + alpha


def call_fuseport(target: str) -> int:
    with Client(target, timeout=120) as c:
        key = c.register(kernel, [torch.randn(5), torch.randn(5), 0.5], alias=ALIAS)
        x, y = torch.randn(7), torch.randn(7)
        for out in (c.execute(key, [x, y, 2.0]), c.fallback(key, [x, y, 2.0])):
            torch.testing.assert_close(out[0], kernel(x, y, 2.0))
    print(f"fuseport: kernel {key} ({ALIAS!r}) ran through Execute and Fallback")
    return key


def call_tritonclient(target: str, key: int) -> None:
    client = triton.InferenceServerClient(target)
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.get_server_metadata().name == "fuseport"
        assert client.is_model_ready(ALIAS)
        assert not client.is_model_ready("no-such-model")
        meta = client.get_model_metadata(ALIAS)
        assert [(i.name, i.datatype, list(i.shape)) for i in meta.inputs] == [
            ("x", "FP32", [-1]),
            ("y", "FP32", [-1]),
            ("alpha", "FP64", [1]),
        ], meta
        assert [(o.name, o.datatype) for o in meta.outputs] == [("output0", "FP32")], meta
        for name in (ALIAS, str(key)):  # by either name, the config names the model by its alias
            config = client.get_model_config(name).config
            data_type = triton.model_config_pb2.DataType.Name
            assert (config.name, config.platform, config.backend, config.max_batch_size) == (
                ALIAS,
                "fuseport",
                "fuseport",
                0,
            ), config
            assert config.version_policy.latest.num_versions == 1, config
            assert [(i.name, data_type(i.data_type), list(i.dims)) for i in config.input] == [
                ("x", "TYPE_FP32", [-1]),
                ("y", "TYPE_FP32", [-1]),
                ("alpha", "TYPE_FP64", [1]),
            ], config
            assert [(o.name, data_type(o.data_type), list(o.dims)) for o in config.output] == [
                ("output0", "TYPE_FP32", [-1])
            ], config
        as_json = client.get_model_config(ALIAS, as_json=True)["config"]
        assert as_json["input"][0] == {"name": "x", "data_type": "TYPE_FP32", "dims": ["-1"]}, as_json
        try:
            client.get_model_config("no-such-model")
        except InferenceServerException as e:
            assert e.status() == "StatusCode.NOT_FOUND", e.status()
        else:
            raise AssertionError("an unknown model has a config")
        index = client.get_model_repository_index()
        assert (ALIAS, "READY") in {(m.name, m.state) for m in index.models}, index

        x = np.random.default_rng(0).standard_normal(11).astype(np.float32)
        y = np.random.default_rng(1).standard_normal(11).astype(np.float32)
        inputs = [triton.InferInput("x", [11], "FP32"), triton.InferInput("y", [11], "FP32"),
                  triton.InferInput("alpha", [1], "FP64")]  # fmt: skip
        inputs[0].set_data_from_numpy(x)
        inputs[1].set_data_from_numpy(y)
        inputs[2].set_data_from_numpy(np.array([0.25]))
        expected = kernel(torch.from_numpy(x), torch.from_numpy(y), 0.25).numpy()
        for name in (ALIAS, str(key)):
            result = client.infer(name, inputs, outputs=[triton.InferRequestedOutput("output0")])
            np.testing.assert_allclose(result.as_numpy("output0"), expected, rtol=1.3e-6, atol=1e-5)
        try:
            client.infer("no-such-model", inputs)
        except InferenceServerException as e:
            assert e.status() == "StatusCode.NOT_FOUND", e.status()
        else:
            raise AssertionError("an unknown model ran")
    finally:
        client.close()
    print(
        "tritonclient: live, ready, metadata, model config, repository index and ModelInfer by alias and by key "
        "agree with torch"
    )


def stubs_clash() -> None:
    try:
        import fuseport.kserve.grpc_service_pb2  # noqa: F401 - the import is the test
    except TypeError as e:  # protobuf: "Couldn't build proto file into descriptor pool: duplicate ..."
        print(f"as documented, the server's inference stubs cannot load beside tritonclient's: {e}")
        return
    raise AssertionError("fuseport.kserve loaded beside tritonclient's stubs: update docs/guides/kserve.md")


if __name__ == "__main__":
    versions = {d: metadata.version(d) for d in ("fuseport", "tritonclient", "protobuf", "grpcio", "torch")}
    print("versions:", ", ".join(f"{d} {v}" for d, v in versions.items()))
    with tempfile.TemporaryDirectory(prefix="fuseport-beside-") as tmp:
        port_file = Path(tmp) / "port"
        proc = subprocess.Popen(
            [sys.executable, "-m", "fuseport.cli", "serve", "--port", "0", "--port-file", str(port_file),
             "--store-dir", str(Path(tmp) / "store"), "--compile-mode", "off"],
        )  # fmt: skip
        try:
            target = f"127.0.0.1:{read_port_file(proc, port_file, 'fuseport serve')}"
            wait_until_serving(target)
            call_tritonclient(target, call_fuseport(target))
        finally:
            assert stop_process(proc) == 0, "fuseport serve did not exit cleanly"
    stubs_clash()
