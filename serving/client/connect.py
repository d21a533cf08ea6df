"""How a client reaches a server: plaintext or TLS (mutual TLS with a client certificate), with or without a
bearer token (docs/security.md).

    security = Security(tls_ca=Path("ca.pem"), token_file=Path("token"))
    channel = security.channel("127.0.0.1:8001")            # grpc.Channel; security.aio_channel: grpc.aio
    stub.ModelInfer(request, metadata=security.metadata())  # ("authorization", "Bearer ...") when a token

Every client command takes the same four flags (serving.cli.flags.security_flags, with XORSERVE_TLS_CA and
so on). When a call cannot reach the server, `explain_unavailable` says in one line why, when the reason is
a mismatch: a plaintext client at a TLS port, a TLS client at a plaintext port, a certificate the other
side does not trust, a client certificate the server requires. The token is read when the client starts
and never printed.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc


class SecurityError(Exception):
    """A TLS or token file that cannot be used: missing, unreadable, empty, or a certificate without its key."""


@dataclass(frozen=True)
class Security:
    tls_ca: Path | None = None  # trust this CA for the server's certificate (TLS)
    tls_cert: Path | None = None  # this client's certificate, for mutual TLS (with tls_key)
    tls_key: Path | None = None
    token_file: Path | None = None  # a bearer token, sent as `authorization: Bearer <token>`

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SecurityError("--tls-cert and --tls-key go together: a client certificate needs its key")

    @classmethod
    def from_args(cls, args) -> Security:
        """From the flags of serving.cli.flags.security (SecurityError when they do not go together)."""
        return cls(args.tls_ca, args.tls_cert, args.tls_key, args.token_file)

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None or self.tls_cert is not None

    def describe(self) -> str:
        """How this client connects, in a few words (for error messages; no secret)."""
        how = "TLS" if self.tls else "plaintext"
        if self.tls_cert is not None:
            how = "mutual TLS"
        return how + (" with a bearer token" if self.token_file is not None else "")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls_ca, "--tls-ca") if self.tls_ca is not None else None,
            private_key=_read(self.tls_key, "--tls-key") if self.tls_key is not None else None,
            certificate_chain=_read(self.tls_cert, "--tls-cert") if self.tls_cert is not None else None,
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata: the bearer token when there is one (read from its file each time this is asked)."""
        if self.token_file is None:
            return ()
        token = _read(self.token_file, "--token-file").decode("utf-8", "replace").strip()
        if not token or any(c.isspace() for c in token):
            raise SecurityError(f"--token-file {self.token_file}: expected one token (no spaces), found none")
        return (("authorization", f"Bearer {token}"),)

    def channel(self, url: str, options: list[tuple[str, object]] | None = None) -> grpc.Channel:
        if self.tls:
            return grpc.secure_channel(url, self.credentials(), options=options)
        return grpc.insecure_channel(url, options=options)

    def aio_channel(self, url: str, options: list[tuple[str, object]] | None = None) -> grpc.aio.Channel:
        if self.tls:
            return grpc.aio.secure_channel(url, self.credentials(), options=options)
        return grpc.aio.insecure_channel(url, options=options)


PLAINTEXT = Security()


def _read(path: Path, flag: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise SecurityError(f"{flag} {path}: {error.strerror or error}") from None
    if not data.strip():
        raise SecurityError(f"{flag} {path}: the file is empty")
    return data


def explain_unavailable(url: str, security: Security, details: str) -> str:
    """One line saying why a call to `url` found no server, when TLS is why; else `details` as they are.

    gRPC's own words for a mismatch are a socket closed or a handshake failed; the port is asked directly
    whether it speaks TLS (a TLS handshake that does not check certificates), and gRPC's details are read for
    the certificate errors."""
    text = " ".join(details.split())
    lowered = text.lower()
    if security.tls:
        if "certificate_verify_failed" in lowered or "certificate verify failed" in lowered:
            return (
                f"{url}: the server's certificate is not trusted: it is not signed by --tls-ca {security.tls_ca}, "
                "or does not name this host"
            )
        if "certificate required" in lowered or "certificate_required" in lowered:
            return f"{url}: the server requires a client certificate (mutual TLS): pass --tls-cert and --tls-key"
        if "unknown ca" in lowered or "bad certificate" in lowered or "unknown_ca" in lowered:
            return (
                f"{url}: the server refused this client's certificate (--tls-cert): its --tls-client-ca did not sign it"
            )
    speaks = probe(url)
    if speaks in (TLS, NEEDS_CLIENT_CERT) and not security.tls:
        return (
            f"{url} serves TLS and this client speaks plaintext: pass --tls-ca (XORSERVE_TLS_CA) with the server's CA"
        )
    if speaks == PLAINTEXT_SERVER and security.tls:
        return f"{url} serves plaintext and this client speaks TLS: drop --tls-ca, --tls-cert and --tls-key"
    if speaks == NEEDS_CLIENT_CERT and security.tls_cert is None:
        return f"{url}: the server requires a client certificate (mutual TLS): pass --tls-cert and --tls-key"
    if speaks == NEEDS_CLIENT_CERT:
        return (
            f"{url}: the server refused this client's certificate (--tls-cert {security.tls_cert}): "
            "it must be signed by the server's --tls-client-ca"
        )
    return text


TLS, NEEDS_CLIENT_CERT, PLAINTEXT_SERVER = "tls", "tls, client certificate required", "plaintext"


def probe(url: str, timeout_s: float = 2.0) -> str | None:
    """What the server at HOST:PORT speaks, asked with a TLS handshake that checks no certificate and offers
    none: TLS, NEEDS_CLIENT_CERT (TLS that refuses a client without a certificate), PLAINTEXT_SERVER, or None
    when nothing answers (no server, or the connection failed before either could be told)."""
    host, _, port = url.rpartition(":")
    host = host.strip("[]")
    if not port.isdigit():
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s) as raw:
            try:
                with context.wrap_socket(raw, server_hostname=host or None) as tls:
                    # TLS 1.3: the server checks the client's certificate after the handshake; gRPC's closes
                    # the connection (some send an alert first), where a server content with none sends its
                    # HTTP/2 settings or waits for the client's.
                    tls.settimeout(min(timeout_s, 0.5))
                    try:
                        closed = tls.recv(1) == b""
                    except ssl.SSLError as error:
                        closed = "CERTIFICATE_REQUIRED" in (error.reason or "").upper() or isinstance(
                            error, ssl.SSLEOFError
                        )
                    except (TimeoutError, ssl.SSLWantReadError):
                        closed = False
                    except OSError:
                        closed = True
                    return NEEDS_CLIENT_CERT if closed else TLS
            except ssl.SSLError as error:
                reason = (error.reason or "").upper()
                if reason in {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "UNEXPECTED_EOF_WHILE_READING"}:
                    return PLAINTEXT_SERVER  # the answer was not TLS at all (an HTTP/2 server's bytes, or none)
                if "CERTIFICATE_REQUIRED" in reason or "HANDSHAKE_FAILURE" in reason:
                    return NEEDS_CLIENT_CERT
                return TLS  # another TLS alert: it speaks TLS
            except (ConnectionResetError, BrokenPipeError, TimeoutError, ssl.SSLEOFError):
                return PLAINTEXT_SERVER
    except OSError:
        return None
