"""Every client command over TLS, mutual TLS and bearer tokens (issue 14): `predict`, `score --url`,
`parity --url`, `loadtest` and `health` reach a server that serves TLS and requires a token with
--tls-ca and --token-file (and one that requires a client certificate with --tls-cert and --tls-key),
and fail in one line, with their documented exit status, when the flags do not fit the server:
plaintext at a TLS server, TLS at a plaintext one, no token or a wrong one, no client certificate or
one another CA signed. Health needs no token (the probes are open). The client library: the sync and
asyncio clients send the token over TLS, and raise a TLS mismatch or a refused token at once, without
retries.

The servers run in this process (tests/conftest.py's ServerThread); the commands are subprocesses.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import ServerThread, TlsFiles, run_xorserve

from serving.client import AsyncInferenceClient, InferenceClient, InferenceError
from serving.client.connect import Security, SecurityError
from serving.server import ServerConfig

CORNERS = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)

TLS_MISMATCH = "serves TLS and this client speaks plaintext"
PLAINTEXT_MISMATCH = "serves plaintext and this client speaks TLS"
NO_TOKEN = "UNAUTHENTICATED: this server requires a bearer token"
WRONG_TOKEN = "UNAUTHENTICATED: the bearer token sent is not one this server accepts"
UNTRUSTED = "the server's certificate is not trusted"
NO_CLIENT_CERT = "the server requires a client certificate (mutual TLS): pass --tls-cert and --tls-key"
REFUSED_CLIENT_CERT = "the server refused this client's certificate"


def _serving(model_repository: Path, tls_files: TlsFiles, **security) -> Iterator[ServerThread]:
    config = ServerConfig(
        model_repository=model_repository,
        device="cpu",
        tls_cert=tls_files.server_cert,
        tls_key=tls_files.server_key,
        auth_token_file=tls_files.token_file,
        **security,
    )
    handle = ServerThread(config).start()
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def tls_server(model_repository: Path, tls_files: TlsFiles):
    """TLS, and every RPC but the open ones requires the token."""
    yield from _serving(model_repository, tls_files)


@pytest.fixture(scope="module")
def mtls_server(model_repository: Path, tls_files: TlsFiles):
    """Mutual TLS (a client certificate signed by tls_files.ca), and the token."""
    yield from _serving(model_repository, tls_files, tls_client_ca=tls_files.ca)


@pytest.fixture(scope="module")
def wrong_token(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wrong-token") / "token"
    path.write_text("not-the-token\n")
    return path


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("csv") / "points.csv"
    path.write_text("x1,x2\n0,0\n0,1\n1,0\n1,1\n")
    return path


def tls(files: TlsFiles) -> list:
    return ["--tls-ca", files.ca, "--token-file", files.token_file]


def mtls(files: TlsFiles) -> list:
    return [*tls(files), "--tls-cert", files.client_cert, "--tls-key", files.client_key]


# The failure cases: the server ("tls", "mtls", or "plain": conftest's `server`), the flags, what the line
# says, and whether the token decides it (the open health probe answers anyway then).
CASES = {
    "plaintext client at a TLS server": ("tls", lambda f: ["--token-file", f.token_file], TLS_MISMATCH, False),
    "TLS client at a plaintext server": ("plain", lambda f: ["--tls-ca", f.ca], PLAINTEXT_MISMATCH, False),
    "no token": ("tls", lambda f: ["--tls-ca", f.ca], NO_TOKEN, True),
    "a wrong token": ("tls", lambda f: ["--tls-ca", f.ca, "--token-file", "WRONG"], WRONG_TOKEN, True),
    "a server certificate another CA signed": (
        "tls",
        lambda f: ["--tls-ca", f.other_ca, "--token-file", f.token_file],
        UNTRUSTED,
        False,
    ),
    "no client certificate at a mutual TLS server": ("mtls", tls, NO_CLIENT_CERT, False),
    "a client certificate another CA signed": (
        "mtls",
        lambda f: [*tls(f), "--tls-cert", f.other_client_cert, "--tls-key", f.other_client_key],
        REFUSED_CLIENT_CERT,
        False,
    ),
}


@pytest.fixture
def servers(request) -> dict:
    """The case's server, started only when a case needs it."""
    return {
        name: lambda name=name: request.getfixturevalue(f"{name}_server" if name != "plain" else "server")
        for name in ("tls", "mtls", "plain")
    }


def case_flags(case: str, files: TlsFiles, wrong: Path) -> list[str]:
    return [str(wrong) if word == "WRONG" else str(word) for word in CASES[case][1](files)]


def exit_status(case: str) -> int:
    """The documented status: credentials refused 2 (usage), a TLS mismatch 3 (unreachable)."""
    return 2 if CASES[case][3] else 3


def command_line(command: str, url: str, tmp_path: Path, small_csv: Path) -> list[str]:
    if command == "predict":
        return ["predict", "--url", url, "0,0", "1,1"]
    if command == "score":
        return ["score", small_csv, tmp_path / "scored.csv", "--url", url, "--retries", "1", "--quiet"]
    if command == "loadtest":
        return ["loadtest", "--url", url, "--out", tmp_path / "loadtest", "--users", "2", "--duration", "2s"]
    if command == "health":
        return ["health", "--url", url]
    raise AssertionError(command)


def the_line(result, command: str) -> str:
    """The one line a failed command printed (health prints its line on stdout, the others on stderr)."""
    text = result.stdout if command == "health" else result.stderr
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"not one line:\n{text}"
    if command == "health":
        assert not result.stderr.strip()
    elif command == "loadtest":  # its run-time errors are log lines
        assert "level=ERROR" in lines[0] and "event=server_" in lines[0]
    else:
        assert lines[0].startswith(f"xorserve {command}: error: "), lines[0]
    return lines[0]


# --- each command reaches a secured server with the right flags ------------------------------------


def test_predict_over_tls_with_a_token(tls_server, tls_files):
    result = run_xorserve("predict", "--url", tls_server.address, *tls(tls_files), "0,0", "1,1")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 3


def test_predict_over_mutual_tls(mtls_server, tls_files):
    result = run_xorserve("predict", "--url", mtls_server.address, *mtls(tls_files), "0,1")
    assert result.returncode == 0, result.stderr


def test_predict_takes_the_files_from_the_environment(tls_server, tls_files):
    env = dict(os.environ, XORSERVE_TLS_CA=str(tls_files.ca), XORSERVE_TOKEN_FILE=str(tls_files.token_file))
    result = run_xorserve("predict", "--url", tls_server.address, "0,1", env=env)
    assert result.returncode == 0, result.stderr


def test_score_through_a_tls_server_with_a_token(tls_server, tls_files, small_csv, tmp_path):
    out = tmp_path / "scored.csv"
    result = run_xorserve("score", small_csv, out, "--url", tls_server.address, *tls(tls_files), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "rows_scored=4 " in result.stdout
    assert out.read_text().splitlines()[0] == "x1,x2,probability,label"


def test_score_through_a_mutual_tls_server(mtls_server, tls_files, small_csv, tmp_path):
    result = run_xorserve("score", small_csv, tmp_path / "o.csv", "--url", mtls_server.address, *mtls(tls_files))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("server_name", ["tls", "mtls"])
def test_health_needs_no_token(servers, tls_files, server_name):
    server = servers[server_name]()
    flags = ["--tls-ca", tls_files.ca]
    if server_name == "mtls":
        flags += ["--tls-cert", tls_files.client_cert, "--tls-key", tls_files.client_key]
    result = run_xorserve("health", "--url", server.address, *flags)
    assert (result.returncode, result.stdout.strip()) == (0, f"{server.address} (server): SERVING"), result.stderr


def test_health_sends_the_token_to_a_server_that_does_not_leave_health_open(server_factory, tls_files):
    server = server_factory(auth_token_file=tls_files.token_file, auth_open=())
    refused = run_xorserve("health", "--url", server.address)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert NO_TOKEN in the_line(refused, "health")
    answered = run_xorserve("health", "--url", server.address, "--token-file", tls_files.token_file)
    assert (answered.returncode, answered.stdout.strip()) == (0, f"{server.address} (server): SERVING")


@pytest.mark.slow
def test_loadtest_sends_tls_client_certificate_and_token_with_every_call(mtls_server, tls_files, tmp_path):
    out = tmp_path / "loadtest"
    result = run_xorserve(
        "loadtest", "--url", mtls_server.address, *mtls(tls_files), "--out", out, "--users", "2", "--duration", "2s"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    total = json.loads((out / "summary.json").read_text())["total"]
    assert total["requests"] > 0 and total["failures"] == 0, total


@pytest.fixture(scope="module")
def parity_server(tmp_path_factory: pytest.TempPathFactory, tls_files: TlsFiles):
    """A TLS server with the token, serving a model folder that parity can check (state_dict.pt too)."""
    import torch

    from trainer.export import export_state_dict
    from trainer.model import XorClassifier

    folder = tmp_path_factory.mktemp("parity") / "xor" / "1"
    folder.mkdir(parents=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        model = XorClassifier()
    torch.save(model.state_dict(), folder / "state_dict.pt")
    export_state_dict(folder / "state_dict.pt", folder / "model.onnx")
    config = ServerConfig(
        model_repository=folder.parent.parent,
        device="cpu",
        tls_cert=tls_files.server_cert,
        tls_key=tls_files.server_key,
        auth_token_file=tls_files.token_file,
    )
    handle = ServerThread(config).start()
    yield handle, folder
    handle.stop()


@pytest.mark.slow
def test_parity_through_a_tls_server_with_a_token(parity_server, tls_files):
    server, folder = parity_server
    result = run_xorserve("parity", folder, "--device", "cpu", "--url", server.address, *tls(tls_files))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "bit-identical to in-process session on: CPUExecutionProvider" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("case", ["no token", "plaintext client at a TLS server"])
def test_parity_with_flags_that_do_not_fit_fails_in_one_line(parity_server, tls_files, wrong_token, case):
    server, folder = parity_server
    command = ["--log-level", "WARNING", "parity", folder, "--device", "cpu", "--url", server.address]
    result = run_xorserve(*command, *case_flags(case, tls_files, wrong_token))
    assert result.returncode == exit_status(case), result.stdout + result.stderr
    assert CASES[case][2] in the_line(result, "parity")


# --- the client library ----------------------------------------------------------------------------


def test_the_clients_send_the_token_over_tls(tls_server, tls_files):
    secured = Security(tls_ca=tls_files.ca, token_file=tls_files.token_file)
    with InferenceClient(tls_server.address, security=secured) as client:
        expected = client.predict(CORNERS).probability

    async def infer():
        async with AsyncInferenceClient(tls_server.address, security=secured) as client:
            return (await client.predict(CORNERS)).probability

    assert np.array_equal(asyncio.run(infer()), expected)


@pytest.mark.parametrize("asynchronous", [False, True])
@pytest.mark.parametrize(
    ("secured", "code", "message"),
    [
        (lambda f: Security(token_file=f.token_file), grpc.StatusCode.UNAVAILABLE, TLS_MISMATCH),
        (lambda f: Security(tls_ca=f.ca), grpc.StatusCode.UNAUTHENTICATED, NO_TOKEN.split(": ", 1)[1]),
    ],
)
def test_a_tls_mismatch_or_a_refused_token_is_raised_at_once_without_retries(
    tls_server, tls_files, asynchronous, secured, code, message
):
    # Retrying would take minutes with these waits; the error comes at once.
    options = {"retries": 5, "backoff_s": 30.0, "security": secured(tls_files)}
    started = time.monotonic()
    with pytest.raises(InferenceError) as error:
        if asynchronous:

            async def infer():
                async with AsyncInferenceClient(tls_server.address, **options) as client:
                    await client.predict(CORNERS)

            asyncio.run(infer())
        else:
            with InferenceClient(tls_server.address, **options) as client:
                client.predict(CORNERS)
    assert time.monotonic() - started < 10
    assert error.value.code == code and message in str(error.value)
    assert error.value.exit_code == (3 if code == grpc.StatusCode.UNAVAILABLE else 2)
    assert error.value.tls_mismatch == (code == grpc.StatusCode.UNAVAILABLE)


def test_a_token_file_that_cannot_be_read_fails_when_the_client_is_made(tmp_path):
    with pytest.raises(SecurityError, match="--token-file"):
        InferenceClient("127.0.0.1:1", security=Security(token_file=tmp_path / "missing"))


# --- and fail in one line when the flags do not fit the server --------------------------------------


def _failure(command, case, servers, tls_files, wrong_token, tmp_path, small_csv):
    server = servers[CASES[case][0]]()
    args = command_line(command, server.address, tmp_path, small_csv)
    result = run_xorserve(*args, *case_flags(case, tls_files, wrong_token))
    assert result.returncode == exit_status(case), result.stdout + result.stderr
    line = the_line(result, command)
    if command == "loadtest":
        assert not (tmp_path / "loadtest" / "locust.log").exists()  # no load sent
    if command == "score":
        assert not (tmp_path / "scored.csv").exists()
    return line


@pytest.mark.parametrize(
    ("command", "case"),
    [
        (command, case)
        for case, (_, _, _, token) in CASES.items()
        for command in ("predict", "score", "loadtest", "health")
        if not (token and command == "health")  # health is open: the token decides nothing there
    ],
)
def test_flags_that_do_not_fit_the_server_fail_in_one_line_saying_why(
    command, case, servers, tls_files, wrong_token, tmp_path, small_csv
):
    server = servers[CASES[case][0]]()
    args = command_line(command, server.address, tmp_path, small_csv)
    result = run_xorserve(*args, *case_flags(case, tls_files, wrong_token))
    assert result.returncode == exit_status(case), result.stdout + result.stderr
    assert CASES[case][2] in the_line(result, command)
    if command == "loadtest":
        assert not (tmp_path / "loadtest" / "locust.log").exists()  # no load was sent
    if command == "score":
        assert not (tmp_path / "scored.csv").exists()


@pytest.mark.parametrize("command", ["predict", "score", "loadtest", "health", "parity"])
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tls-cert", "CERT"], "--tls-cert and --tls-key go together"),
        (["--tls-ca", "MISSING"], "--tls-ca MISSING: No such file or directory"),
        (["--token-file", "MISSING"], "--token-file MISSING: No such file or directory"),
    ],
)
def test_files_that_cannot_be_used_are_a_usage_error_in_one_line(command, flags, message, tls_files, tmp_path):
    missing = tmp_path / "missing.pem"
    words = {"CERT": str(tls_files.client_cert), "MISSING": str(missing)}
    flags = [words.get(word, word) for word in flags]
    if command == "parity":
        args = ["parity", tmp_path, "--device", "cpu", "--url", "127.0.0.1:1"]
    else:
        args = command_line(command, "127.0.0.1:1", tmp_path, tmp_path / "in.csv")
        if command == "score":
            (tmp_path / "in.csv").write_text("x1,x2\n0,1\n")
    result = run_xorserve(*args, *flags)
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"xorserve {command}: error: ")
    assert message.replace("MISSING", str(missing)) in line
