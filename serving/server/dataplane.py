"""The data plane: the loaded models and what each RPC does with them, independent of gRPC plumbing.

It loads the repository (one Batcher per model version), resolves model names and versions, runs
inference through the batchers, answers metadata and configuration, and drains on shutdown. Errors
are raised as serving.server.errors exceptions; the servicer maps them to status codes.

A request's way down and back, in one place (`infer`): `prepare` resolves the model and decodes and
checks the inputs into a Job, then `run` awaits the batcher's result for it and encodes the response.
A stream calls the two halves itself, to await in line a job the batcher answers soon.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving._proto import grpc_service_pb2 as pb
from serving._proto import model_config_pb2 as mc
from serving.devices import CUDA, DeviceUnavailableError
from serving.protocol import TensorSpec
from serving.runtime import SessionSettings
from serving.server import codec
from serving.server.batching import Batcher, BatchPolicy, Coalescer
from serving.server.errors import (
    STATUS,
    DeadlineExceededError,
    ModelNotFoundError,
    ServingError,
    TooLargeError,
    UnavailableError,
)
from serving.server.metrics import UNKNOWN_MODEL, Metrics, ModelMetrics
from serving.server.repository import MODEL_FILE, PLATFORM, LoadedVersion, discover, load_version, rows_within

log = logging.getLogger(__name__)

SERVER_NAME = "xorserve"
EXTENSIONS = ("model_configuration", "streaming")


@dataclass
class ServedVersion:
    """A loaded model version with its batcher and metrics."""

    loaded: LoadedVersion
    batcher: Batcher
    metrics: ModelMetrics
    output_names: tuple[str, ...]
    max_batch_size: int  # reported in ModelConfig: 0 when the model has no batch axis
    decoder: codec.InputDecoder
    encoder: codec.ResponseEncoder
    row_bytes: int | None  # bytes of all outputs per row when every output has a batch axis and fixed other dims


class Job:
    """One decoded request on its way through the data plane (see `DataPlane.prepare`)."""

    __slots__ = ("served", "request", "inputs", "rows", "outputs", "deadline", "start")

    def __init__(self, served, request, inputs, rows, outputs, deadline, start) -> None:
        self.served: ServedVersion = served
        self.request: pb.ModelInferRequest = request
        self.inputs: dict[str, np.ndarray] = inputs
        self.rows: int = rows  # at least 1: a model without a batch axis takes one row
        self.outputs: tuple[TensorSpec, ...] = outputs  # those the request asks for
        self.deadline: float | None = deadline  # on the event loop's clock
        self.start: float = start  # perf_counter at arrival, for the request duration

    @property
    def soon(self) -> bool:
        """The batcher answers it within a few turns of the loop (a stream awaits it in line)."""
        return self.served.batcher.answers_soon(self.rows)


class DataPlane:
    def __init__(
        self,
        repository: Path,
        settings: SessionSettings,
        instances: int,
        policy: BatchPolicy,
        metrics: Metrics,
        server_version: str = "",
        max_message_bytes: int = 64 * 1024 * 1024,
        inline_max_us: int = 0,
    ) -> None:
        self._repository = repository
        self._settings = settings
        self._instances = instances
        self._policy = policy
        self._metrics = metrics
        self._server_version = server_version
        self._max_message_bytes = max_message_bytes
        self._inline_max_s = inline_max_us / 1e6
        self._models: dict[str, dict[str, ServedVersion]] = {}
        self._latest: dict[str, str] = {}
        self.failures: dict[str, str] = {}  # "model" or "model/version" -> why it did not load
        self._loaded = False
        self.draining = False
        self._last_refusal = 0.0  # loop time of the latest request refused while draining
        self._resolved: dict[tuple[str, str], ServedVersion] = {}  # (name, version) as requested -> served
        self._coalescer = Coalescer()  # shared by every model's batcher: one end-of-turn check for all

    # -- lifecycle ---------------------------------------------------------------------------------

    async def load(self) -> None:
        """Loads every model version (in a thread: the event loop keeps answering liveness meanwhile).

        A model that fails to load is recorded in `failures` and logged; the server stays not ready.
        DeviceUnavailableError (--device cuda without CUDA) is raised: it concerns every model.
        """
        found, problems = discover(self._repository)
        for model, reason in problems.items():
            self._fail(model, reason)
        if not found and not problems:
            self._fail("(repository)", f"no models in {self._repository}")
        for where in found:
            try:
                loaded = await asyncio.to_thread(load_version, where, self._settings, self._instances)
                inline = await asyncio.to_thread(rows_within, loaded, self._batch_rows(loaded), self._inline_max_s)
            except DeviceUnavailableError:
                raise
            except Exception as exc:
                self._fail(f"{where.model}/{where.version}", f"{type(exc).__name__}: {exc}")
                continue
            self._serve(loaded, *inline)
        self._loaded = True

    def _fail(self, key: str, reason: str) -> None:
        self.failures[key] = reason
        log.error("event=model_load_failed model=%s reason=%r", key, reason)

    def _batch_rows(self, loaded: LoadedVersion) -> int:
        """The rows of the largest batch: max_batch_size, or 1 for a model without a batch axis."""
        return self._policy.max_batch_size if loaded.batchable else 1

    def _serve(self, loaded: LoadedVersion, inline_rows: int, inline_s: float) -> None:
        """Starts serving a loaded version. Batches of up to `inline_rows` rows (those that run within
        --inline-max-us, `inline_s` for the largest: see `rows_within`) run on the event loop; larger
        ones in the instance threads."""
        batchable = loaded.batchable
        batch_rows = self._batch_rows(loaded)
        threads = f"threads:{len(loaded.sessions)}"
        log.info(
            "event=model_serving model=%s version=%s batch_rows=%d inline_rows=%d inline_us=%.1f execution=%s",
            loaded.model,
            loaded.version,
            batch_rows,
            inline_rows,
            inline_s * 1e6,
            "event_loop" if inline_rows >= batch_rows else f"event_loop+{threads}" if inline_rows else threads,
        )
        policy = (
            self._policy
            if batchable
            else BatchPolicy(max_batch_size=1, max_queue_size=self._policy.max_queue_size, enabled=False)
        )
        metrics = self._metrics.for_model(loaded.model, loaded.version, loaded.provider)
        outputs = tuple(spec.name for spec in loaded.outputs)
        batcher = Batcher(
            f"{loaded.model}/{loaded.version}",
            loaded.sessions,
            [spec.name for spec in loaded.inputs],
            outputs,
            policy,
            metrics,
            inline_rows=inline_rows,
            coalescer=self._coalescer,
        )
        batcher.start()
        served = ServedVersion(
            loaded,
            batcher,
            metrics,
            outputs,
            self._policy.max_batch_size if batchable else 0,
            codec.InputDecoder(loaded.inputs),
            codec.ResponseEncoder(loaded.model, loaded.version, loaded.outputs),
            _row_bytes(loaded.outputs) if batchable else None,
        )
        self._models.setdefault(loaded.model, {})[loaded.version] = served
        self._resolved.clear()
        latest = self._latest.get(loaded.model)
        if latest is None or int(loaded.version) > int(latest):
            self._latest[loaded.model] = loaded.version

    @property
    def ready(self) -> bool:
        return self._loaded and not self.failures and bool(self._models) and not self.draining

    def model_names(self) -> list[str]:
        return sorted(self._models)

    def drain(self) -> Awaitable[list]:
        """Refuses new inference requests from now on; the result completes when every queued and
        running one has been answered."""
        self.draining = True
        self._last_refusal = asyncio.get_running_loop().time()  # the quiet period starts now at the earliest
        return asyncio.gather(*(served.batcher.drain() for served in self._versions()))

    async def wait_quiet(self, quiet_s: float, limit_s: float) -> None:
        """After drain(): waits until no request was refused for quiet_s since draining began (at most limit_s).

        Clients told UNAVAILABLE go elsewhere; stopping the gRPC server while they still send would
        cancel calls it had received but not yet handed to us (CANCELLED: the client cannot tell
        whether they ran), so the server keeps refusing them explicitly for a moment.
        """
        loop = asyncio.get_running_loop()
        give_up = loop.time() + limit_s
        while (now := loop.time()) < give_up:
            wait = self._last_refusal + quiet_s - now
            if wait <= 0:
                return
            await asyncio.sleep(min(wait, give_up - now))

    async def close(self) -> None:
        await asyncio.gather(*(served.batcher.close() for served in self._versions()))

    def _versions(self) -> list[ServedVersion]:
        return [served for versions in self._models.values() for served in versions.values()]

    # -- lookups -----------------------------------------------------------------------------------

    def resolve(self, name: str, version: str = "") -> ServedVersion:
        versions = self._models.get(name)
        if versions is None:
            if any(key == name or key.startswith(name + "/") for key in self.failures):
                raise UnavailableError(f"model '{name}' failed to load; the server log says why")
            raise ModelNotFoundError(f"unknown model '{name}'; models: {self.model_names()}")
        served = versions.get(version or self._latest[name])
        if served is None:
            if f"{name}/{version}" in self.failures:
                raise UnavailableError(f"model '{name}' version '{version}' failed to load; the server log says why")
            known = sorted(versions, key=int)
            raise ModelNotFoundError(f"model '{name}' has no version '{version}'; versions: {known}")
        return served

    def model_ready(self, name: str, version: str = "") -> bool:
        try:
            self.resolve(name, version)
        except ServingError:
            return False
        return not self.draining

    def providers(self) -> list[str]:
        seen: dict[str, None] = {}
        for served in self._versions():
            seen.update(dict.fromkeys(served.loaded.providers))
        return list(seen)

    # -- RPCs --------------------------------------------------------------------------------------

    def server_metadata(self) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME,
            version=self._server_version,
            extensions=EXTENSIONS,
            properties={"providers": ",".join(self.providers()), "device": self._settings.device},
        )

    def model_metadata(self, name: str, version: str = "") -> pb.ModelMetadataResponse:
        served = self.resolve(name, version)
        loaded = served.loaded
        tensor = pb.ModelMetadataResponse.TensorMetadata
        properties = dict(loaded.properties)
        properties["providers"] = ",".join(loaded.providers)
        properties["version"] = loaded.version
        return pb.ModelMetadataResponse(
            name=loaded.model,
            versions=sorted(self._models[loaded.model], key=int),
            platform=PLATFORM,
            inputs=[tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in loaded.inputs],
            outputs=[tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in loaded.outputs],
            properties=properties,
        )

    def model_config(self, name: str, version: str = "") -> pb.ModelConfigResponse:
        """Triton's ModelConfig: with max_batch_size > 0 the dims leave out the batch axis."""
        served = self.resolve(name, version)
        loaded = served.loaded
        skip = 1 if served.max_batch_size > 0 else 0
        config = mc.ModelConfig(
            name=loaded.model,
            platform=PLATFORM,
            backend="onnxruntime",
            runtime="onnxruntime",
            max_batch_size=served.max_batch_size,
            input=[
                mc.ModelInput(name=s.name, data_type=codec.CONFIG_DATATYPES[s.datatype], dims=s.shape[skip:])
                for s in loaded.inputs
            ],
            output=[
                mc.ModelOutput(name=s.name, data_type=codec.CONFIG_DATATYPES[s.datatype], dims=s.shape[skip:])
                for s in loaded.outputs
            ],
            instance_group=[
                mc.ModelInstanceGroup(
                    name=f"{loaded.model}_{loaded.version}",
                    count=len(loaded.sessions),
                    kind=mc.ModelInstanceGroup.KIND_GPU if loaded.provider == CUDA else mc.ModelInstanceGroup.KIND_CPU,
                )
            ],
            default_model_filename=MODEL_FILE,
            parameters={"providers": mc.ModelParameter(string_value=",".join(loaded.providers))},
            model_transaction_policy=mc.ModelTransactionPolicy(decoupled=False),
        )
        if self._policy.enabled and served.max_batch_size > 0:
            config.dynamic_batching.max_queue_delay_microseconds = self._policy.max_queue_delay_us
        return pb.ModelConfigResponse(config=config)

    def infer(self, request: pb.ModelInferRequest, time_remaining: float | None) -> Awaitable[bytes]:
        """Runs one request through its model's batcher: await the result for its response, a serialized
        ModelInferResponse (serving.server.codec.ResponseEncoder).
        `time_remaining`: seconds to its deadline, if any. Raises what `prepare` and `run` raise."""
        return self.run(self.prepare(request, time_remaining))  # one coroutine, not two, per request

    def prepare(self, request: pb.ModelInferRequest, time_remaining: float | None) -> Job:
        """Resolves the model and decodes and checks the request; raises serving.server.errors exceptions."""
        start = time.perf_counter()
        served = self._resolved.get((request.model_name, request.model_version))
        if served is None:
            served = self._resolve_cached(request.model_name, request.model_version)
        try:
            if self.draining:
                self._last_refusal = asyncio.get_running_loop().time()
                raise UnavailableError("server is shutting down and takes no new requests; retry elsewhere")
            inputs, rows = served.decoder.decode(request)
            outputs = served.encoder.outputs_for(request)
            deadline = None
            if time_remaining is not None:
                if time_remaining <= 0:
                    raise DeadlineExceededError("the request's deadline passed before it could run; it was not run")
                deadline = asyncio.get_running_loop().time() + time_remaining
        except Exception as exc:
            _count_failure(served.metrics, exc)
            raise
        return Job(served, request, inputs, rows or 1, outputs, deadline, start)

    async def run(self, job: Job) -> bytes:
        """Awaits the job's outputs from the batcher and encodes its response; raises as `prepare` does."""
        served = job.served
        try:
            results = await served.batcher.run(job.inputs, job.rows, job.deadline)
            response = self._respond(served, job, results)
        except Exception as exc:
            _count_failure(served.metrics, exc)
            raise
        metrics = served.metrics
        metrics.success.count += 1
        metrics.request_seconds.observe(time.perf_counter() - job.start)
        return response

    def _resolve_cached(self, name: str, version: str) -> ServedVersion:
        """`resolve`, remembered (for `prepare`, which looks in `_resolved` first); failures are counted."""
        try:
            served = self.resolve(name, version)
        except ServingError as exc:
            self._metrics.failure(
                name if name in self._models else UNKNOWN_MODEL, UNKNOWN_MODEL, STATUS[type(exc)].name
            )
            raise
        if len(self._resolved) < 1024:  # bounded: names come from clients
            self._resolved[(name, version)] = served
        return served

    def _respond(self, served: ServedVersion, job: Job, results: list) -> bytes:
        # Outputs whose size is known per row need the exact sum only near the limit.
        if served.row_bytes is None or job.rows * served.row_bytes > self._max_message_bytes:
            by_name = dict(zip(served.output_names, results, strict=True))
            size = sum(by_name[spec.name].nbytes for spec in job.outputs)
            if size > self._max_message_bytes:
                raise TooLargeError(
                    f"the response would carry {size} bytes of outputs; the limit is {self._max_message_bytes} "
                    "(--max-message-bytes); send fewer rows per request"
                )
        return served.encoder.encode(job.request.id, job.outputs, results)


def _row_bytes(outputs: tuple[TensorSpec, ...]) -> int | None:
    """Bytes per row of all outputs together, when every dimension but the batch axis is fixed."""
    if any(-1 in spec.shape[1:] for spec in outputs):
        return None
    return sum(spec.dtype.itemsize * math.prod(spec.shape[1:]) for spec in outputs)


def _count_failure(metrics, exc: Exception) -> None:
    metrics.failure(STATUS[type(exc)].name if isinstance(exc, ServingError) else "INTERNAL")
