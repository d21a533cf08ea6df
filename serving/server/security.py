"""TLS, mutual TLS and bearer tokens on the server (docs/security.md).

- `tls_credentials`: --tls-cert and --tls-key serve TLS; --tls-client-ca also requires a client certificate
  that CA signed (mutual TLS). The files are read again, for the next connection, once they changed
  (gRPC's dynamic credentials): replacing them rotates the certificates without a restart.
- `TokenAuth`: with --auth-token-file, every RPC but the open ones (--auth-open: by default the probes,
  health and ServerLive/ServerReady, and reflection) needs `authorization: Bearer <token>` with one of the
  file's tokens (one per line; `#` comments). Compared in constant time (SHA-256 digests, every token);
  the file is read again within TOKEN_RELOAD_S of a change. A missing, malformed or wrong token is answered
  UNAUTHENTICATED, counted in `xorserve_auth_failures_total{reason}`, and logged at a bounded rate, never
  with the token.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import ssl
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection

from serving._proto import grpc_service_pb2 as pb
from serving.protocol import OPEN_BY_DEFAULT
from serving.server.errors import Throttle

log = logging.getLogger(__name__)

TOKEN_RELOAD_S = 1.0  # a changed token file is in force at most this long after the change (on a request)
TLS_RELOAD_S = 1.0  # and changed certificate files for connections from then on
DEFAULT_OPEN = OPEN_BY_DEFAULT

INFERENCE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]


assert reflection.SERVICE_NAME in OPEN_BY_DEFAULT, "reflection's service was renamed: update OPEN_BY_DEFAULT"


class SecurityConfigError(ValueError):
    """A TLS or token setting that cannot work; `xorserve serve` says so in one line and exits 2."""


# --- TLS -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None

    def stamp(self) -> tuple:
        """What changes when a file is replaced or rewritten."""
        stamps = []
        for path in (self.cert, self.key, self.client_ca):
            if path is None:
                continue
            info = os.stat(path)
            stamps.append((info.st_ino, info.st_mtime_ns, info.st_size))
        return tuple(stamps)

    def configuration(self):
        """The files as gRPC's certificate configuration, checked first (SecurityConfigError naming the file)."""
        cert, key = _read(self.cert, "--tls-cert"), _read(self.key, "--tls-key")
        client_ca = _read(self.client_ca, "--tls-client-ca") if self.client_ca is not None else None
        _check_pair(cert, key, self.cert, self.key)
        if client_ca is not None:
            try:
                ssl.create_default_context(cadata=client_ca.decode("ascii", "replace"))
            except (ssl.SSLError, ValueError) as error:
                raise SecurityConfigError(
                    f"--tls-client-ca {self.client_ca}: not a PEM certificate ({error})"
                ) from None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)


def tls_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Server credentials that pick up changed files for new connections (the old configuration goes on
    when the new files are unusable, with a log line saying why)."""
    initial = files.configuration()
    state = {"stamp": files.stamp(), "checked": time.monotonic()}

    def fetch():
        now = time.monotonic()
        if now - state["checked"] < TLS_RELOAD_S:
            return None
        state["checked"] = now
        try:
            stamp = files.stamp()
            if stamp == state["stamp"]:
                return None
            configuration = files.configuration()
        except (OSError, SecurityConfigError) as error:
            log.error("event=tls_reload_failed error=%s (the previous certificates stay in use)", error)
            return None
        state["stamp"] = stamp
        log.info("event=tls_reloaded cert=%s client_ca=%s", files.cert, files.client_ca or "-")
        return configuration

    return grpc.dynamic_ssl_server_credentials(
        initial, fetch, require_client_authentication=files.client_ca is not None
    )


def _read(path: Path, flag: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise SecurityConfigError(f"{flag} {path}: {error.strerror or error}") from None
    if b"-----BEGIN" not in data:
        raise SecurityConfigError(f"{flag} {path}: not a PEM file")
    return data


def _check_pair(cert: bytes, key: bytes, cert_path: Path, key_path: Path) -> None:
    """Raises unless the key is the certificate's (Python's ssl module reads files only: a private temp dir)."""
    with tempfile.TemporaryDirectory(prefix="xorserve-tls-") as folder:
        cert_file, key_file = Path(folder, "cert.pem"), Path(folder, "key.pem")
        cert_file.write_bytes(cert)
        key_file.touch(mode=0o600)
        key_file.write_bytes(key)
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_file, key_file)
        except ssl.SSLError as error:
            raise SecurityConfigError(
                f"--tls-cert {cert_path} and --tls-key {key_path} cannot be used together: {error.reason or error}"
            ) from None


# --- tokens ----------------------------------------------------------------------------------------


def open_methods(names: tuple[str, ...]) -> frozenset[str]:
    """--auth-open's names (a method of the inference service, `Service/Method`, or a whole service) as the
    full method paths gRPC shows (`/inference.GRPCInferenceService/ServerLive`); SecurityConfigError for a
    name that is none of these."""
    services = {
        INFERENCE.full_name: [m.name for m in INFERENCE.methods],
        HEALTH.full_name: [m.name for m in HEALTH.methods],
        reflection.SERVICE_NAME: ["ServerReflectionInfo"],
    }
    paths = set()
    for name in names:
        if name in services:
            paths.update(f"/{name}/{method}" for method in services[name])
        elif name in services[INFERENCE.full_name]:
            paths.add(f"/{INFERENCE.full_name}/{name}")
        elif "/" in name and name.split("/", 1)[1] in services.get(name.split("/", 1)[0], ()):
            paths.add(f"/{name}")
        else:
            known = ", ".join([*services, *services[INFERENCE.full_name]])
            raise SecurityConfigError(f"--auth-open: {name!r} is not a method or service of this server ({known})")
    return frozenset(paths)


def _kinds() -> dict[str, tuple[bool, bool]]:
    """Full method path -> (client streaming, server streaming), for the denial's handler."""
    kinds = {f"/{reflection.SERVICE_NAME}/ServerReflectionInfo": (True, True)}
    for service in (INFERENCE, HEALTH):
        for method in service.methods:
            kinds[f"/{service.full_name}/{method.name}"] = (method.client_streaming, method.server_streaming)
    return kinds


class TokenFile:
    """The tokens in force: SHA-256 digests of the file's lines, read again within TOKEN_RELOAD_S of a change."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._stamp: tuple | None = None
        self._checked = 0.0
        self.digests: tuple[bytes, ...] = ()
        self.reload(initial=True)

    def reload(self, initial: bool = False) -> None:
        try:
            info = os.stat(self.path)
            stamp = (info.st_ino, info.st_mtime_ns, info.st_size)
            if stamp == self._stamp:
                return
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            if initial:
                raise SecurityConfigError(
                    f"--auth-token-file {self.path}: {getattr(error, 'strerror', None) or error}"
                ) from None
            log.error(
                "event=token_reload_failed file=%s error=%s (the previous tokens stay in force)", self.path, error
            )
            return
        tokens = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if initial and not tokens:
            raise SecurityConfigError(f"--auth-token-file {self.path}: no token in it (one per line)")
        if any(any(c.isspace() for c in token) for token in tokens):
            message = f"--auth-token-file {self.path}: a token with a space in it (one token per line)"
            if initial:
                raise SecurityConfigError(message)
            log.error(
                "event=token_reload_failed file=%s error=%s (the previous tokens stay in force)", self.path, message
            )
            return
        self._stamp = stamp
        self.digests = tuple(hashlib.sha256(token.encode()).digest() for token in tokens)
        if not initial:
            log.info("event=tokens_reloaded file=%s tokens=%d", self.path, len(tokens))

    def accepts(self, token: str) -> bool:
        now = time.monotonic()
        if now - self._checked >= TOKEN_RELOAD_S:
            self._checked = now
            self.reload()
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        accepted = False
        for known in self.digests:  # every one, whatever matched: the time does not tell which
            accepted |= hmac.compare_digest(digest, known)
        return accepted


class TokenAuth(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: TokenFile, open_paths: frozenset[str], count_failure) -> None:
        self._tokens = tokens
        self._open = open_paths
        self._count = count_failure
        self._kinds = _kinds()
        self._throttle = Throttle(10.0, _log_suppressed)

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        method = details.method
        if method in self._open:
            return await continuation(details)
        value = None
        for key, item in details.invocation_metadata or ():
            if key == "authorization":
                value = item
                break
        if value is None:
            reason = "missing"
            message = (
                "this server requires a bearer token: send metadata 'authorization: Bearer <token>' "
                "(xorserve clients: --token-file)"
            )
        elif not isinstance(value, str) or not value.startswith("Bearer ") or not value[7:].strip():
            reason = "malformed"
            message = "the 'authorization' metadata is not 'Bearer <token>'"
        elif not self._tokens.accepts(value[7:].strip()):
            reason = "wrong"
            message = "the bearer token sent is not one this server accepts"
        else:
            return await continuation(details)
        self._count(reason)
        held = self._throttle.admit((method, reason))
        if held is not None:
            log.info("event=unauthenticated method=%s reason=%s suppressed=%d", method, reason, held)
        return _denial(self._kinds.get(method, (False, False)), message)


def _log_suppressed(key: tuple, count: int, _note: str) -> None:
    log.info("event=unauthenticated_suppressed method=%s reason=%s count=%d", key[0], key[1], count)


def _denial(kind: tuple[bool, bool], message: str) -> grpc.RpcMethodHandler:
    """A handler of the method's kind that answers UNAUTHENTICATED without reading the request."""

    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # (a generator: the streaming handlers' shape)

    client_streaming, server_streaming = kind
    if client_streaming and server_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming)
    if server_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming)
    if client_streaming:
        return grpc.stream_unary_rpc_method_handler(unary)
    return grpc.unary_unary_rpc_method_handler(unary)
