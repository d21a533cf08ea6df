"""Clients of a running server: the Open Inference Protocol client (sync and asyncio), the health check,
and ServerProcess, which runs `xorserve serve` as a child process for the demo, runners and tests."""

from serving.client.inference import AsyncInferenceClient, InferenceClient, InferenceError, Prediction

__all__ = ["AsyncInferenceClient", "InferenceClient", "InferenceError", "Prediction"]
