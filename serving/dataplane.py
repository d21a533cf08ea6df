"""The data plane: the loaded models and what each RPC does with them, independent of gRPC plumbing.

It loads the repository (one Batcher per model version), resolves model names and versions, runs
inference through the batchers, answers metadata and configuration, and drains on shutdown. Errors
are raised as serving.errors exceptions; the servicer maps them to status codes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path

from serving import converters
from serving._proto import grpc_service_pb2 as pb
from serving._proto import model_config_pb2 as mc
from serving.batching import Batcher, BatchPolicy, Coalescer
from serving.errors import (
    STATUS,
    DeadlineExceededError,
    ModelNotFoundError,
    ServingError,
    TooLargeError,
    UnavailableError,
)
from serving.metrics import UNKNOWN_MODEL, Metrics, ModelMetrics
from serving.repository import MODEL_FILE, PLATFORM, LoadedVersion, discover, load_version, rows_within
from serving.runtime import CUDA, DeviceUnavailableError, SessionSettings

log = logging.getLogger(__name__)

SERVER_NAME = "xorserve"
EXTENSIONS = ("model_configuration", "streaming")


class Prompt:
    """An answer the batcher gives soon (a request held for coalescing with the others the event loop
    is busy with, see serving.batching): a stream awaits it in line instead of starting a task for it."""

    __slots__ = ("_answer",)

    def __init__(self, answer: Awaitable[pb.ModelInferResponse]) -> None:
        self._answer = answer

    def __await__(self):
        return self._answer.__await__()


@dataclass
class ServedVersion:
    """A loaded model version with its batcher and metrics."""

    loaded: LoadedVersion
    batcher: Batcher
    metrics: ModelMetrics
    output_names: tuple[str, ...]
    max_batch_size: int  # reported in ModelConfig: 0 when the model has no batch axis
    decoder: converters.InputDecoder
    encoder: converters.ResponseEncoder


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
            converters.InputDecoder(loaded.inputs),
            converters.ResponseEncoder(loaded.model, loaded.version, loaded.outputs),
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
                mc.ModelInput(name=s.name, data_type=converters.CONFIG_DATATYPES[s.datatype], dims=s.shape[skip:])
                for s in loaded.inputs
            ],
            output=[
                mc.ModelOutput(name=s.name, data_type=converters.CONFIG_DATATYPES[s.datatype], dims=s.shape[skip:])
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

    async def infer(self, request: pb.ModelInferRequest, time_remaining: float | None) -> pb.ModelInferResponse:
        """Runs one request through its model's batcher. `time_remaining`: seconds to the deadline."""
        result = self.start_infer(request, time_remaining)
        if type(result) is not pb.ModelInferResponse:
            result = await result
        return result

    def start_infer(
        self, request: pb.ModelInferRequest, time_remaining: float | None
    ) -> pb.ModelInferResponse | Awaitable[pb.ModelInferResponse]:
        """`infer` without the coroutine: the response itself when the model ran at once (inline
        execution, nothing queued, the event loop otherwise idle), else an awaitable of it (a `Prompt`
        when it is held for coalescing). Raises serving.errors exceptions."""
        start = time.perf_counter()
        served = self._resolved.get((request.model_name, request.model_version))
        if served is None:
            try:
                served = self.resolve(request.model_name, request.model_version)
            except ServingError as exc:
                known = request.model_name in self._models
                name = request.model_name if known else UNKNOWN_MODEL
                self._metrics.failure(name, UNKNOWN_MODEL, STATUS[type(exc)].name)
                raise
            if len(self._resolved) < 1024:  # bounded: names come from clients
                self._resolved[(request.model_name, request.model_version)] = served
        metrics = served.metrics
        try:
            if self.draining:
                self._last_refusal = asyncio.get_running_loop().time()
                raise UnavailableError("server is shutting down and takes no new requests; retry elsewhere")
            arrays, rows = served.decoder.decode(request)
            wanted = converters.requested_outputs(request, served.loaded.outputs)
            if time_remaining is not None and time_remaining <= 0:
                raise DeadlineExceededError("the request's deadline passed before it could run; it was not run")
            batcher = served.batcher
            outputs = batcher.run_now(arrays, rows or 1)
            if outputs is None:
                later = self._finish_later(served, request, arrays, rows, wanted, time_remaining, start)
                return Prompt(later) if batcher.answers_soon(rows or 1) else later
            response = self._respond(served, request, wanted, outputs)
        except Exception as exc:
            _count_failure(metrics, exc)
            raise
        _count_success(metrics, start)
        return response

    async def _finish_later(
        self, served, request, arrays, rows, wanted, time_remaining, start
    ) -> pb.ModelInferResponse:
        """The queued path: waits for the batcher, then answers as `start_infer` does."""
        metrics = served.metrics
        try:
            deadline = None
            if time_remaining is not None:
                deadline = asyncio.get_running_loop().time() + time_remaining
            outputs = await served.batcher.submit(arrays, rows or 1, deadline)
            response = self._respond(served, request, wanted, outputs)
        except Exception as exc:
            _count_failure(metrics, exc)
            raise
        _count_success(metrics, start)
        return response

    def _respond(self, served: ServedVersion, request, wanted, outputs: list) -> pb.ModelInferResponse:
        results = dict(zip(served.output_names, outputs, strict=True))
        size = sum(output.nbytes for output in outputs)
        if size > self._max_message_bytes:
            size = sum(results[spec.name].nbytes for spec in wanted)
        if size > self._max_message_bytes:
            raise TooLargeError(
                f"the response would carry {size} bytes of outputs; the limit is {self._max_message_bytes} "
                "(--max-message-bytes); send fewer rows per request"
            )
        return served.encoder.encode(request.id, wanted, results)


def _count_failure(metrics, exc: Exception) -> None:
    metrics.failure(STATUS[type(exc)].name if isinstance(exc, ServingError) else "INTERNAL")


def _count_success(metrics, start: float) -> None:
    metrics.success.inc()
    metrics.request_seconds.observe(time.perf_counter() - start)
