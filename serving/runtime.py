"""ONNX Runtime sessions with an explicit execution-provider choice: CUDA when asked, never a silent fallback.

`open_session(path, device)` is the one place that turns `--device auto|cuda|cpu` into providers:
- `cpu`: the CPU execution provider.
- `cuda`: CUDA only, with CPU fallback disabled, so start-up fails loudly when CUDA cannot be had.
- `auto`: CUDA if it loads, else CPU with a warning naming what was asked and what was got.
CUDA runs with `use_tf32=0` unless `tf32=True`, so outputs match fp32 PyTorch to fp32 precision.
The server, the parity check and in-process file scoring all use it: a leaf below all three.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from serving.devices import CPU, CUDA, DEVICES, DeviceUnavailableError

log = logging.getLogger(__name__)

# ONNX Runtime prints its own errors to stderr when the CUDA provider cannot load; we report that
# ourselves, once, in one line (see `open_session`).
ort.set_default_logger_severity(4)


@dataclass(frozen=True)
class SessionSettings:
    device: str = "auto"
    tf32: bool = False
    intra_op_threads: int = 1
    inter_op_threads: int = 1


def session_options(settings: SessionSettings) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_op_threads
    options.inter_op_num_threads = settings.inter_op_threads
    # No CPU memory arena: ONNX Runtime's keeps the peak of every run for the session's life (an 8 M-row
    # request left 390 MB behind), and without it small runs cost the same (docs/serving.md, "Memory").
    options.enable_cpu_mem_arena = False
    # Spinning threads would busy-wait and take the CPU from the event loop on a small machine.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if settings.device == "cuda":
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    return options


def _providers(settings: SessionSettings) -> list:
    cuda = (CUDA, {"use_tf32": "1" if settings.tf32 else "0"})
    return {"cpu": [CPU], "cuda": [cuda], "auto": [cuda, CPU]}[settings.device]


def _preload_cuda() -> None:
    # Loads the CUDA/cuDNN libraries shipped by the nvidia-* wheels, when present.
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            # It prints installation advice when no CUDA is found; the provider check reports that.
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                preload()
        except Exception as exc:  # a missing library is reported by the provider check below
            log.debug("event=preload_dlls_failed error=%r", exc)


def open_session(path: str | Path, settings: SessionSettings | None = None) -> ort.InferenceSession:
    """An InferenceSession on the providers `settings.device` asks for; see the module docstring."""
    settings = settings or SessionSettings()
    if settings.device not in DEVICES:
        raise ValueError(f"device {settings.device!r} is not one of {', '.join(DEVICES)}")
    if settings.device != "cpu":
        _preload_cuda()
    try:
        session = ort.InferenceSession(
            str(path), sess_options=session_options(settings), providers=_providers(settings)
        )
    except Exception as exc:
        if settings.device == "cuda":
            raise DeviceUnavailableError(f"--device cuda: CUDA execution provider unavailable: {exc}") from exc
        raise
    in_use = session.get_providers()
    if settings.device == "cuda" and CUDA not in in_use:
        raise DeviceUnavailableError(f"--device cuda: session runs on {in_use}, not CUDA")
    if settings.device == "auto" and CUDA not in in_use:
        log.warning("event=cuda_unavailable asked=auto using=%s model=%s", ",".join(in_use), path)
    log.info(
        "event=session_open model=%s device=%s providers=%s tf32=%d",
        path,
        settings.device,
        ",".join(in_use),
        settings.tf32,
    )
    return session


def primary_provider(session: ort.InferenceSession) -> str:
    """The provider that runs the model: the first of those in use."""
    return session.get_providers()[0]
