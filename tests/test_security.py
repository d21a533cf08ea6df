"""The server's TLS, mutual TLS and bearer tokens (docs/security.md): the right credentials pass, a missing
or wrong one fails with a one-line error, the probes stay open, rotated tokens and certificates take
effect without a restart, and no token reaches the log or the metrics page.

Certificates come from trustme (tests/conftest.py, `tls_files`). The client commands against such a
server are in tests/test_security_clients.py.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import trustme
from conftest import infer_request, metric_samples, run_xorserve
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from serving._proto import grpc_service_pb2 as pb
from serving._proto import grpc_service_pb2_grpc as pb_grpc
from serving.client.connect import Security, explain_unavailable
from serving.server.security import TLS_RELOAD_S, TOKEN_RELOAD_S

ROOT = Path(__file__).resolve().parent.parent
X = np.array([[0, 1]], np.float32)
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


def code_of(call, *args, **kwargs):
    try:
        call(*args, **kwargs)
    except grpc.RpcError as error:
        return error.code(), error.details()
    return grpc.StatusCode.OK, ""


def stub_for(address: str, security: Security) -> tuple[grpc.Channel, pb_grpc.GRPCInferenceServiceStub]:
    channel = security.channel(address)
    return channel, pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture
def tls_server(server_factory, tls_files):
    return server_factory(tls_cert=tls_files.server_cert, tls_key=tls_files.server_key)


@pytest.fixture
def mtls_server(server_factory, tls_files):
    return server_factory(tls_cert=tls_files.server_cert, tls_key=tls_files.server_key, tls_client_ca=tls_files.ca)


@pytest.fixture
def token_server(server_factory, tls_files):
    return server_factory(auth_token_file=tls_files.token_file)


def failure_line(address: str, security: Security) -> str:
    """What a client is told when its first call finds no server it can talk to."""
    channel, stub = stub_for(address, security)
    with channel:
        code, details = code_of(stub.ServerLive, pb.ServerLiveRequest(), timeout=5)
    assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
    line = explain_unavailable(address, security, details)
    assert "\n" not in line
    return line


# --- TLS ---------------------------------------------------------------------------------------------


def test_tls_with_the_servers_ca_is_answered_and_a_plaintext_client_is_told_to_use_tls(tls_server, tls_files):
    channel, stub = stub_for(tls_server.address, Security(tls_ca=tls_files.ca))
    with channel:
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
        assert stub.ModelInfer(infer_request(X), timeout=10).outputs
    line = failure_line(tls_server.address, Security())
    assert line == (
        f"{tls_server.address} serves TLS and this client speaks plaintext: pass --tls-ca (XORSERVE_TLS_CA) "
        "with the server's CA"
    )


def test_a_tls_client_at_a_plaintext_server_is_told_so(server, tls_files):
    line = failure_line(server.address, Security(tls_ca=tls_files.ca))
    assert (
        line == f"{server.address} serves plaintext and this client speaks TLS: drop --tls-ca, --tls-cert and --tls-key"
    )


def test_a_certificate_from_another_ca_is_not_trusted(tls_server, tls_files):
    line = failure_line(tls_server.address, Security(tls_ca=tls_files.other_ca))
    assert line.startswith(f"{tls_server.address}: the server's certificate is not trusted"), line


def test_mutual_tls_takes_a_client_certificate_of_its_ca_only(mtls_server, tls_files):
    good = Security(tls_ca=tls_files.ca, tls_cert=tls_files.client_cert, tls_key=tls_files.client_key)
    channel, stub = stub_for(mtls_server.address, good)
    with channel:
        assert stub.ModelInfer(infer_request(X), timeout=10).outputs
    without = failure_line(mtls_server.address, Security(tls_ca=tls_files.ca))
    assert "client certificate" in without and "--tls-cert" in without, without
    stranger = Security(tls_ca=tls_files.ca, tls_cert=tls_files.other_client_cert, tls_key=tls_files.other_client_key)
    refused = failure_line(mtls_server.address, stranger)
    assert "refused this client's certificate" in refused, refused


def test_replaced_certificate_files_serve_new_connections_without_a_restart(server_factory, tls_files, tmp_path):
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(tls_files.server_cert.read_bytes())
    key.write_bytes(tls_files.server_key.read_bytes())
    handle = server_factory(tls_cert=cert, tls_key=key)
    old = Security(tls_ca=tls_files.ca)
    channel, stub = stub_for(handle.address, old)
    with channel:
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
    # Rotate to a certificate of a new CA (written beside, then renamed over: what tools do).
    new_ca = trustme.CA()
    issued = new_ca.issue_cert("localhost", "127.0.0.1")
    (tmp_path / "new_ca.pem").write_bytes(new_ca.cert_pem.bytes())
    (tmp_path / "next.pem").write_bytes(issued.cert_chain_pems[0].bytes())
    (tmp_path / "next.key").write_bytes(issued.private_key_pem.bytes())
    (tmp_path / "next.key").rename(key)
    (tmp_path / "next.pem").rename(cert)
    time.sleep(TLS_RELOAD_S + 0.2)
    deadline = time.monotonic() + 10
    while True:
        channel, stub = stub_for(handle.address, Security(tls_ca=tmp_path / "new_ca.pem"))
        with channel:
            code, details = code_of(stub.ServerLive, pb.ServerLiveRequest(), timeout=3)
        if code == grpc.StatusCode.OK or time.monotonic() > deadline:
            break
        time.sleep(0.3)  # the server reads the files again at a handshake at most once per TLS_RELOAD_S
    assert code == grpc.StatusCode.OK, details
    assert "not trusted" in failure_line(handle.address, old)


# --- tokens ------------------------------------------------------------------------------------------


def test_inference_needs_the_token_and_is_answered_with_it(token_server, tls_files):
    channel, stub = stub_for(token_server.address, Security())
    with channel:
        code, details = code_of(stub.ModelInfer, infer_request(X), timeout=10)
        assert (code, details) == (
            UNAUTHENTICATED,
            "this server requires a bearer token: send metadata 'authorization: Bearer <token>' "
            "(xorserve clients: --token-file)",
        )
        wrong = (("authorization", "Bearer not-the-token"),)
        code, details = code_of(stub.ModelInfer, infer_request(X), timeout=10, metadata=wrong)
        assert (code, details) == (UNAUTHENTICATED, "the bearer token sent is not one this server accepts")
        malformed = (("authorization", tls_files.token),)  # without "Bearer "
        code, details = code_of(stub.ModelInfer, infer_request(X), timeout=10, metadata=malformed)
        assert (code, details) == (UNAUTHENTICATED, "the 'authorization' metadata is not 'Bearer <token>'")
        right = Security(token_file=tls_files.token_file).metadata()
        assert stub.ModelInfer(infer_request(X), timeout=10, metadata=right).outputs
        for method, request in [
            (stub.ModelMetadata, pb.ModelMetadataRequest(name="xor")),
            (stub.ServerMetadata, pb.ServerMetadataRequest()),
            (stub.RepositoryIndex, pb.RepositoryIndexRequest()),
            (stub.ModelReady, pb.ModelReadyRequest(name="xor")),
        ]:
            assert code_of(method, request, timeout=10)[0] == UNAUTHENTICATED, method
            assert code_of(method, request, timeout=10, metadata=right)[0] != UNAUTHENTICATED, method
        # A stream: refused as a whole without a token, answered with one.
        code, _ = code_of(lambda: list(stub.ModelStreamInfer(iter([infer_request(X)]), timeout=10)))
        assert code == UNAUTHENTICATED
        answers = list(stub.ModelStreamInfer(iter([infer_request(X)] * 3), timeout=10, metadata=right))
        assert [a.error_message for a in answers] == ["", "", ""]


def test_the_probes_and_reflection_stay_open(token_server):
    with grpc.insecure_channel(token_server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        listing = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        services = [s.name for s in next(listing).list_services_response.service]
        assert "inference.GRPCInferenceService" in services


def test_with_nothing_open_every_rpc_needs_the_token(server_factory, tls_files):
    handle = server_factory(auth_token_file=tls_files.token_file, auth_open=())
    with grpc.insecure_channel(handle.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert code_of(stub.ServerLive, pb.ServerLiveRequest(), timeout=10)[0] == UNAUTHENTICATED
        check = health_pb2_grpc.HealthStub(channel).Check
        assert code_of(check, health_pb2.HealthCheckRequest(), timeout=10)[0] == UNAUTHENTICATED
        right = Security(token_file=tls_files.token_file).metadata()
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10, metadata=right).live


def test_a_rotated_token_file_takes_effect_without_a_restart(server_factory, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("# one token per line\nfirst-token\n")
    handle = server_factory(auth_token_file=tokens)

    def code_with(token: str) -> grpc.StatusCode:
        with grpc.insecure_channel(handle.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            metadata = (("authorization", f"Bearer {token}"),)
            return code_of(stub.ModelInfer, infer_request(X), timeout=10, metadata=metadata)[0]

    assert code_with("first-token") == grpc.StatusCode.OK
    assert code_with("second-token") == UNAUTHENTICATED
    # Overlap: both in force while the clients move over; then the old one goes.
    tokens.write_text("first-token\nsecond-token\n")
    time.sleep(TOKEN_RELOAD_S + 0.2)
    code_with("x")  # (the file is looked at on a request, at most once per TOKEN_RELOAD_S)
    assert code_with("second-token") == grpc.StatusCode.OK
    assert code_with("first-token") == grpc.StatusCode.OK
    tokens.write_text("second-token\n")
    time.sleep(TOKEN_RELOAD_S + 0.2)
    code_with("x")
    assert code_with("first-token") == UNAUTHENTICATED
    assert code_with("second-token") == grpc.StatusCode.OK
    # A file that cannot be read keeps the tokens in force (a rotation mid-way must not lock everyone out).
    tokens.unlink()
    time.sleep(TOKEN_RELOAD_S + 0.2)
    assert code_with("second-token") == grpc.StatusCode.OK


def test_refusals_are_counted_and_no_token_reaches_the_log_or_the_metrics_page(server_factory, tls_files, caplog):
    caplog.set_level(logging.DEBUG)
    handle = server_factory(auth_token_file=tls_files.token_file)
    with grpc.insecure_channel(handle.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        wrong = (("authorization", "Bearer " + tls_files.token[::-1]),)
        for _ in range(3):
            code_of(stub.ModelInfer, infer_request(X), timeout=10)
        for _ in range(2):
            code_of(stub.ModelInfer, infer_request(X), timeout=10, metadata=wrong)
        right = Security(token_file=tls_files.token_file).metadata()
        stub.ModelInfer(infer_request(X), timeout=10, metadata=right)
    metrics_address = f"127.0.0.1:{handle.metrics_port}"
    counted = {
        s.labels["reason"]: s.value for s in metric_samples(metrics_address) if s.name == "xorserve_auth_failures_total"
    }
    assert counted == {"missing": 3.0, "wrong": 2.0}
    page = urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10).read().decode()
    for secret in (tls_files.token, tls_files.token[::-1], str(tls_files.token_file)):
        assert secret not in page
        assert secret not in caplog.text
    assert "event=unauthenticated" in caplog.text


def test_metrics_host_is_where_the_metrics_page_listens(server_factory):
    handle = server_factory(host="127.0.0.1", metrics_host="localhost")
    assert handle.running.metrics_address == f"localhost:{handle.metrics_port}"
    page = urllib.request.urlopen(f"http://localhost:{handle.metrics_port}/metrics", timeout=10).read()
    assert b"xorserve_inference_success" in page or b"xorserve_" in page


# --- settings that cannot work: one line, exit 2 -----------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tls-cert", "{server_cert}"], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", "{ca}"], "--tls-client-ca needs --tls-cert and --tls-key"),
        (["--tls-cert", "{server_cert}", "--tls-key", "{client_key}"], "cannot be used together"),
        (["--tls-cert", "{ca}", "--tls-key", "{missing}"], "No such file or directory"),
        (["--auth-token-file", "{empty}"], "no token in it"),
        (["--auth-token-file", "{token_file}", "--auth-open", "ServerLive,Nope"], "'Nope' is not a method"),
    ],
)
def test_settings_that_cannot_work_are_one_line_and_exit_2(
    flags, message, tls_files, tmp_path, shipped_model_repository
):
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    paths = {**{k: getattr(tls_files, k) for k in ("server_cert", "client_key", "ca", "token_file")}}
    paths.update(missing=tmp_path / "missing.pem", empty=empty)
    args = [flag.format(**paths) for flag in flags]
    done = run_xorserve(
        "serve", "--model-repository", shipped_model_repository, "--device", "cpu", "--port", "0",
        "--metrics-port", "0", *args, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("xorserve serve: cannot start:")]
    assert len(lines) == 1 and message in lines[0], done.stderr[-2000:]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="scripts/tls-dev-certs.sh needs openssl")
def test_the_dev_certificate_script_makes_a_working_mutual_tls_and_token_setup(server_factory, tmp_path):
    folder = tmp_path / "tls"
    made = subprocess.run([str(ROOT / "scripts" / "tls-dev-certs.sh"), str(folder)], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    handle = server_factory(
        tls_cert=folder / "server.pem",
        tls_key=folder / "server.key",
        tls_client_ca=folder / "ca.pem",
        auth_token_file=folder / "token",
    )
    security = Security(folder / "ca.pem", folder / "client.pem", folder / "client.key", folder / "token")
    channel, stub = stub_for(handle.address, security)
    with channel:
        assert stub.ModelInfer(infer_request(X), timeout=10, metadata=security.metadata()).outputs
    assert oct((folder / "server.key").stat().st_mode & 0o777) == "0o600"
