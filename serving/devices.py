"""The devices a model can run on (`--device auto|cuda|cpu`) and the error for one that cannot be had.

A leaf: it imports no ONNX Runtime and no torch, so every command (and the trainer) can name devices and
catch DeviceUnavailableError without loading either. serving.runtime turns a device into ONNX Runtime's
execution providers.
"""

from __future__ import annotations

DEVICES = ("auto", "cuda", "cpu")
CUDA = "CUDAExecutionProvider"  # ONNX Runtime's names for the execution providers
CPU = "CPUExecutionProvider"


class DeviceUnavailableError(RuntimeError):
    """`--device cuda` was asked for and CUDA could not be had."""
