"""serving.launch.ServerProcess: a server child on free ports, ready on its READY line, never left behind."""

import subprocess
import sys
import textwrap

import psutil
import pytest

from serving.client import InferenceClient
from serving.client.launch import ServerProcess, ServerStartError


def test_started_server_answers_and_stops_with_exit_0(model_repository):
    with ServerProcess.start(model_repository) as server:
        with InferenceClient(server.url) as client:
            assert client.ready()
        assert server.stop() == 0


def test_a_model_that_fails_to_load_fails_the_start_with_the_servers_reason(tmp_path):
    (tmp_path / "xor" / "1").mkdir(parents=True)
    (tmp_path / "xor" / "1" / "model.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(ServerStartError, match="NOT_READY"):
        ServerProcess.start(tmp_path, timeout_s=120)


_ORPHANING_PARENT = textwrap.dedent(
    """
    import os, signal, sys
    from serving.client.launch import ServerProcess
    server = ServerProcess.start(sys.argv[1])
    print(server.process.pid, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # dies without stopping the server
    """
)


def test_server_stops_when_the_process_that_started_it_is_killed(model_repository):
    parent = subprocess.run(
        [sys.executable, "-c", _ORPHANING_PARENT, str(model_repository)], capture_output=True, text=True, timeout=120
    )
    server_pid = int(parent.stdout.split()[0])
    try:
        server = psutil.Process(server_pid)
    except psutil.NoSuchProcess:
        return  # already gone
    server.wait(timeout=60)  # raises psutil.TimeoutExpired while the orphaned server keeps running
    assert not server.is_running()
