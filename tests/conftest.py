"""Shared fixtures: small ONNX models built with onnx.helper, model repositories, in-process servers.

- `model_builder`: the function `build_model(path, seed=0, metadata=None)`, which writes an XOR-shaped
  model (input `input` FP32 [batch, 2]; outputs `logits` and `probability` FP32 [batch, 1]; a 2-4-1
  Tanh network with random weights; IR 10).
- `model_repository`: a repository with `xor/1/model.onnx` (session-scoped; read-only by convention).
- `server`: an in-process xorserve server on free ports serving `model_repository`, shared by a
  module; `.address` ("127.0.0.1:PORT"), `.grpc_port`, `.metrics_port`, `.running` (RunningServer).
- `server_factory(**config)`: starts more servers with ServerConfig overrides; each stops at test end.
- `shipped_model_repository`: the repository's `models/` folder; skips when models/xor/1 is missing.
- `cuda_works`: whether ONNX Runtime's CUDA execution provider opens a session here (session-scoped).
- `serve_without_cuda(*flags)`: runs `xorserve serve --device cuda` with `flags` on `model_repository`
  to its exit (`subprocess.CompletedProcess`, text); skips the test where CUDA works.
- `refused_address`: "127.0.0.1:PORT" where a connection is refused for the whole test (a bound socket
  that does not listen, so no other program can take the port meanwhile).
The server runs its asyncio loop in a background thread, so tests stay synchronous.

Helpers shared by the test modules (`from conftest import infer_request, ...`):
- `infer_request(x, model="xor", ...)`: a ModelInferRequest carrying `x` as raw FP32 input `input`;
- `outputs_of(response)`: a ModelInferResponse's raw outputs as arrays, by name;
- `cpu_outputs(model_path, x)`: what in-process ONNX Runtime on the CPU answers, by output name;
- `run_xorserve(*args)`: `xorserve ARGS` as a subprocess, to its exit (text);
- `metric_samples(address)`: the samples of a server's /metrics page.

The suite runs the same whatever the user's environment holds (`pytest_configure`): every XORSERVE_*,
LOCUST_* and PROMETHEUS_MULTIPROC_DIR variable is removed, HOME is an empty folder (Locust reads
~/.locust.conf), and XORSERVE_DEVICE=cpu, so that on a machine with a GPU the tests that compare with CPU
sessions still run on the CPU (the `gpu` tests ask for CUDA by name).
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from serving._proto import grpc_service_pb2 as pb
from serving.devices import DeviceUnavailableError
from serving.runtime import SessionSettings, open_session
from serving.server import RunningServer, ServerConfig, start_server

ROOT = Path(__file__).resolve().parent.parent
_HOME: list[str] = []


def pytest_configure(config) -> None:
    for name in list(os.environ):
        if name.startswith(("XORSERVE_", "LOCUST_")) or name == "PROMETHEUS_MULTIPROC_DIR":
            del os.environ[name]
    os.environ["XORSERVE_DEVICE"] = "cpu"
    _HOME.append(tempfile.mkdtemp(prefix="xorserve-tests-home-"))
    os.environ["HOME"] = _HOME[0]


def pytest_unconfigure(config) -> None:
    for home in _HOME:
        shutil.rmtree(home, ignore_errors=True)


def infer_request(
    x: np.ndarray, model: str = "xor", version: str = "", request_id: str = "", **fields
) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=list(x.shape))
    return pb.ModelInferRequest(
        model_name=model,
        model_version=version,
        id=request_id,
        inputs=[tensor],
        raw_input_contents=[np.ascontiguousarray(x, np.float32).tobytes()],
        **fields,
    )


def outputs_of(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    return {
        tensor.name: np.frombuffer(raw, dtype=np.float32).reshape(tensor.shape)
        for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


@functools.cache
def _cpu_session(model_path: str):
    return open_session(model_path, SessionSettings(device="cpu"))


def cpu_outputs(model_path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    session = _cpu_session(str(model_path))
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"input": np.asarray(x, np.float32)}), strict=True))


def run_xorserve(*args, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "serving.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def metric_samples(address: str) -> list:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def build_model(path: Path, seed: int = 0, metadata: dict[str, str] | None = None) -> Path:
    """An XOR-shaped 2-4-1 Tanh network with random weights, saved at `path` (parents created)."""
    rng = np.random.default_rng(seed)
    weights = {
        "W1": rng.normal(size=(2, 4)).astype(np.float32),
        "B1": rng.normal(size=(4,)).astype(np.float32),
        "W2": rng.normal(size=(4, 1)).astype(np.float32),
        "B2": rng.normal(size=(1,)).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["input", "W1"], ["h0"]),
        helper.make_node("Add", ["h0", "B1"], ["h1"]),
        helper.make_node("Tanh", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "W2"], ["h3"]),
        helper.make_node("Add", ["h3", "B2"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["probability"]),
    ]
    graph = helper.make_graph(
        nodes,
        "xor_fixture",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 2])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1]),
            helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch", 1]),
        ],
        initializer=[numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    helper.set_model_props(model, {"source": "tests/conftest.py", "seed": str(seed), **(metadata or {})})
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="session")
def model_builder() -> Callable[..., Path]:
    return build_model


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repository")
    build_model(root / "xor" / "1" / "model.onnx", seed=1)
    return root


@pytest.fixture(scope="session")
def shipped_model_repository() -> Path:
    root = ROOT / "models"
    if not (root / "xor" / "1" / "model.onnx").is_file():
        pytest.skip("models/xor/1/model.onnx has not been trained and exported yet")
    return root


class ServerThread:
    """An in-process server whose event loop runs in a daemon thread."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="xorserve-test-server", daemon=True)
        self.running: RunningServer | None = None

    def start(self, timeout_s: float = 60.0) -> ServerThread:
        self._thread.start()
        try:
            self.running = self.call(start_server(self.config), timeout_s)
        except BaseException:
            self._shutdown_loop()
            raise
        return self

    def call(self, coroutine, timeout_s: float = 60.0):
        """Runs a coroutine on the server's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    @property
    def address(self) -> str:
        return self.running.address

    @property
    def grpc_port(self) -> int:
        return self.running.grpc_port

    @property
    def metrics_port(self) -> int:
        return self.running.metrics_port

    def stop(self, grace_s: float = 10.0, catch_up_s: float = 0.0) -> None:
        """Stops the server; no catch-up period by default (tests stop their clients first)."""
        if self.running is not None:
            self.call(self.running.stop(grace_s, catch_up_s), grace_s + 30)
            self.running = None
        self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)
        self.loop.close()


@pytest.fixture(scope="session")
def cuda_works(model_repository: Path) -> bool:
    try:
        open_session(model_repository / "xor" / "1" / "model.onnx", SessionSettings(device="cuda"))
    except DeviceUnavailableError:
        return False
    return True


@pytest.fixture
def serve_without_cuda(model_repository: Path, cuda_works: bool) -> Callable[..., subprocess.CompletedProcess]:
    if cuda_works:
        pytest.skip("CUDA works here; this checks the machine without it")

    def run(*flags: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "serving.cli", "serve", "--model-repository", str(model_repository)]
        command += [*flags, "--device", "cuda", "--port", "0", "--metrics-port", "0"]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    return run


@pytest.fixture
def refused_address() -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(scope="module")
def server(model_repository: Path) -> Iterator[ServerThread]:
    handle = ServerThread(ServerConfig(model_repository=model_repository, device="cpu")).start()
    yield handle
    handle.stop()


@pytest.fixture
def server_factory(model_repository: Path) -> Iterator[Callable[..., ServerThread]]:
    started: list[ServerThread] = []

    def start(**overrides) -> ServerThread:
        overrides.setdefault("model_repository", model_repository)
        overrides.setdefault("device", "cpu")
        handle = ServerThread(ServerConfig(**overrides))
        started.append(handle)
        return handle.start()

    yield start
    for handle in started:
        handle.stop()


@dataclass(frozen=True)
class TlsFiles:
    """Certificates from trustme (docs/security.md): a CA that signed the server's certificate (for
    localhost and 127.0.0.1) and a client's, another CA that signed a client certificate the server must
    refuse, and a token file."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_cert: Path
    other_client_key: Path
    token_file: Path
    token: str


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    import trustme

    folder = tmp_path_factory.mktemp("tls")
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    client, stranger = ca.issue_cert("client@example.test"), other.issue_cert("client@example.test")
    paths = {}
    for name, blob in {
        "ca": ca.cert_pem,
        "server_cert": server.cert_chain_pems[0],
        "server_key": server.private_key_pem,
        "client_cert": client.cert_chain_pems[0],
        "client_key": client.private_key_pem,
        "other_ca": other.cert_pem,
        "other_client_cert": stranger.cert_chain_pems[0],
        "other_client_key": stranger.private_key_pem,
    }.items():
        paths[name] = folder / f"{name}.pem"
        blob.write_to_path(str(paths[name]))
    token = "tok-" + os.urandom(12).hex()
    (folder / "token").write_text(token + "\n")
    return TlsFiles(**paths, token_file=folder / "token", token=token)
