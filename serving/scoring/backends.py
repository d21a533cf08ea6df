"""The two scoring back-ends: ONNX Runtime in-process, or a server over the Open Inference Protocol.

Both take a float32 [n, k] matrix and return the model's `probability` output as float32 [n]; they
are called from several threads at once (ONNX Runtime and gRPC both release the GIL while working).
The label is derived by the caller from the probability, the same way for both, so that the two
back-ends give the same bits when the model and its execution provider are the same.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from serving.client.connect import Security

log = logging.getLogger(__name__)

OUTPUT = "probability"


class ScorerError(RuntimeError):
    """The model cannot score these features, or the server gave an answer that does not fit."""


def _check_width(input_shape, n_features: int, where: str) -> None:
    width = input_shape[-1] if input_shape else None
    if len(input_shape or []) != 2 or (isinstance(width, int) and width >= 0 and width != n_features):
        raise ScorerError(f"{where} takes input of shape {list(input_shape)}; {n_features} feature column(s) given")


def _as_probabilities(out: np.ndarray, n: int, where: str) -> np.ndarray:
    if out.dtype != np.float32 or out.size != n:
        raise ScorerError(f"{where} returned {OUTPUT!r} as {out.dtype} {list(out.shape)}; expected float32 [{n}, 1]")
    return out.reshape(n)


class InProcessScorer:
    """An ONNX Runtime session on this machine, opened by `serving.runtime` like the server's."""

    def __init__(self, model: str | Path, n_features: int, device: str = "auto"):
        from serving.runtime import SessionSettings, open_session, primary_provider

        path = Path(model)
        if path.is_dir():
            path = path / "model.onnx"
        if not path.is_file():
            raise FileNotFoundError(f"no ONNX model at {path}")
        self._session = open_session(path, SessionSettings(device=device))
        inputs = self._session.get_inputs()
        outputs = [o.name for o in self._session.get_outputs()]
        if len(inputs) != 1:
            raise ScorerError(f"model {path} has {len(inputs)} inputs; scoring needs one")
        if OUTPUT not in outputs:
            raise ScorerError(f"model {path} has no {OUTPUT!r} output (it has {', '.join(outputs)})")
        _check_width(inputs[0].shape, n_features, f"model {path}")
        self._input = inputs[0].name
        self.path = path  # the model file itself
        self.description = f"model={path} provider={primary_provider(self._session)}"

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        (out,) = self._session.run([OUTPUT], {self._input: x})
        return _as_probabilities(out, len(x), "the model")

    def close(self) -> None:
        self._session = None

    def __enter__(self) -> InProcessScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RemoteScorer:
    """A model on a running server, through `serving.client.InferenceClient` (one channel, many threads)."""

    def __init__(
        self,
        url: str,
        n_features: int,
        model: str = "xor",
        version: str = "",
        timeout_s: float = 30.0,
        retries: int = 5,
        *,
        security: Security | None = None,
    ):
        from serving.client import InferenceClient
        from serving.client.connect import PLAINTEXT

        # retries: how long a server that is starting, draining or full may keep us waiting (with backoff).
        # security: TLS and the bearer token (serving.client.connect; None: plaintext, no token).
        self._client = InferenceClient(
            url, model=model, version=version, timeout_s=timeout_s, retries=retries, security=security or PLAINTEXT
        )
        try:
            metadata = self._client.metadata()  # also the reachability check: raises UNAVAILABLE after retries
            inputs, outputs = metadata.get("inputs", []), [o["name"] for o in metadata.get("outputs", [])]
            where = f"model {model!r} at {url}"
            if len(inputs) != 1:
                raise ScorerError(f"{where} has {len(inputs)} inputs; scoring needs one")
            if OUTPUT not in outputs:
                raise ScorerError(f"{where} has no {OUTPUT!r} output (it has {', '.join(outputs)})")
            _check_width(list(inputs[0].get("shape", [])), n_features, where)
        except BaseException:
            self._client.close()
            raise
        self.description = f"url={url} model={model}" + (f" version={version}" if version else "")

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        out = self._client.infer(x, outputs=[OUTPUT])[OUTPUT]
        return _as_probabilities(out, len(x), "the server")

    def close(self) -> None:
        # Cancels requests still in flight, so that an interrupted run stops at once.
        self._client.close()

    def __enter__(self) -> RemoteScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
