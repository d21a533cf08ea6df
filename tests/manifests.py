"""Helpers shared by the manifest tests (tests/test_k8s.py, tests/test_kserve.py), which check Kubernetes and
KServe manifests without a cluster.

- `KUBERNETES`: the Kubernetes version whose OpenAPI schemas the manifests are validated against;
- `xorserve_command(container)`: the container's `xorserve CMD ARGS` parsed as serving.cli parses it, with
  the container's environment in place of this process's XORSERVE_* variables, so a flag, a variable or a
  value the command refuses fails; every XORSERVE_* variable must be one the command reads, and every flag
  spelled in full (argparse would take an abbreviation, which a new flag can make ambiguous);
- `running(container, replace)`: the container's command line and env run here, as a subprocess, with the
  arguments named in `replace` replaced (a mount path, ports), until its READY line;
- `probe(port, service)`: a grpc.health.v1 Check, as the kubelet's gRPC probe asks it; `free_port()`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from unittest import mock

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_compose import parse_xorserve

from serving.cli.flags import PREFIX
from serving.cli.main import command_parser

KUBERNETES = "1.33.0"  # the schemas the manifests are checked against
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def command_line(container: dict) -> list[str]:
    return container.get("args") or container["command"]


def container_env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def xorserve_command(container: dict) -> argparse.Namespace:
    command = command_line(container)
    assert command[0] == "xorserve", f"{container['name']}: not an xorserve command: {command}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX)} | container_env(container)
    with mock.patch.dict(os.environ, env, clear=True):  # the parser reads its variables when it is built
        parser, _ = command_parser(command[1])
        parsed = parse_xorserve(command)
    for variable in (e["name"] for e in container.get("env", []) if e["name"].startswith(PREFIX)):
        assert variable in parser.env_flags, f"{container['name']}: xorserve {command[1]} reads no {variable}"
    for word in command[2:]:  # argparse takes a flag's unambiguous prefix; a manifest spells it out
        if word.startswith("--"):
            assert word.split("=")[0] in parser._option_string_actions, f"{container['name']}: {word} abbreviates"
    return parsed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def probe(port: int, service: str) -> int | None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            return (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                .status
            )
        except grpc.RpcError:
            return None


@contextlib.contextmanager
def running(container: dict, replace: dict[str, str]) -> Iterator[subprocess.Popen]:
    """The container's xorserve command with its env (HOME stays this test's), every argument equal to a key of
    `replace` replaced by its value; yields the process once it printed READY, kills it if it still runs."""
    args = [replace.get(a, a) for a in command_line(container)]
    assert args[0] == "xorserve"
    env = {**os.environ, **container_env(container), "HOME": os.environ.get("HOME", "/tmp")}
    process = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", *args[1:]],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout.readline().startswith("READY "), "the server did not start"
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
