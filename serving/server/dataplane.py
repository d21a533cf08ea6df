"""The data plane: what each RPC does with the models being served, independent of gRPC plumbing.

It runs inference through the models' batchers, answers metadata, configuration and the repository
RPCs, and drains on shutdown; serving.server.models loads and unloads the models. Errors are raised as
serving.server.errors exceptions; the servicer maps them to status codes.

A request's way down and back, in one place (`infer`): `prepare` resolves the model and decodes and
checks the inputs into a Job, then `run` awaits the batcher's result for it and encodes the response.
A stream calls the two halves itself, to await in line a job the batcher answers soon. A Job counts as
held by its model version from `prepare` to the end of `run`, so that a version being unloaded answers
every request already routed to it first.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import time
from collections.abc import Awaitable

import numpy as np

from serving._proto import grpc_service_pb2 as pb
from serving._proto import model_config_pb2 as mc
from serving.devices import CUDA
from serving.protocol import TensorSpec
from serving.runtime import SessionSettings
from serving.server import codec
from serving.server.batching import BatchPolicy
from serving.server.errors import (
    STATUS,
    DeadlineExceededError,
    ServingError,
    TooLargeError,
    UnavailableError,
)
from serving.server.metrics import UNKNOWN_MODEL, Metrics
from serving.server.models import Models, ServedVersion
from serving.server.repository import MODEL_FILE, PLATFORM

log = logging.getLogger(__name__)

SERVER_NAME = "xorserve"
EXTENSIONS = ("model_configuration", "model_repository", "streaming")
# After a request or response of at least this many bytes, the freed memory is given back to the
# system (`MemoryReturn`), RETURN_AFTER_S later (once gRPC has sent the response and dropped the request).
LARGE_BYTES = 16 * 1024 * 1024
LARGE_ROWS_AT_LEAST = 1024  # below it the bytes are not counted (a model's rows are rarely 16 KiB)
RETURN_AFTER_S = 0.3
# A request held while the server drains (DataPlane.refused) is told UNAVAILABLE this long before its
# deadline (a tenth of the time it had, if less), so that the client learns why rather than
# DEADLINE_EXCEEDED: the answer must reach a loaded client before its own timer fires, and 5 ms was too
# little on a busy 2-core machine.
REFUSE_BEFORE_DEADLINE_S = 0.05


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

    def input_bytes(self) -> int:
        return sum(array.nbytes for array in self.inputs.values())


class DataPlane:
    def __init__(
        self,
        models: Models,
        settings: SessionSettings,
        policy: BatchPolicy,
        metrics: Metrics,
        server_version: str = "",
        max_message_bytes: int = 64 * 1024 * 1024,
        strict_readiness: bool = True,
        max_request_rows: int = 0,
    ) -> None:
        self.models = models
        self._settings = settings
        self._policy = policy
        self._metrics = metrics
        self._server_version = server_version
        self._max_message_bytes = max_message_bytes
        self._strict = strict_readiness
        self._max_request_rows = max_request_rows or None  # 0: no limit
        self._memory = MemoryReturn()
        self.draining = False
        self.refusing = False
        self._released: asyncio.Event | None = None
        self._last_refusal = 0.0  # loop time of the latest request refused while draining
        self._resolved: dict[tuple[str, str], ServedVersion] = {}  # (name, version) as requested -> served
        self._routes = 0  # the models' routing generation the cache was filled under

    # -- lifecycle ---------------------------------------------------------------------------------

    async def load(self) -> None:
        """Loads what the model control mode loads at start-up (serving.server.models)."""
        await self.models.start()

    @property
    def failures(self) -> dict[str, str]:
        return self.models.failures

    @property
    def ready(self) -> bool:
        """Ready to serve: started, not draining and, with strict readiness (Triton's default), every model
        that is to be served has a version ready."""
        if not self.models.started or self.draining:
            return False
        return self.models.all_wanted_ready() if self._strict else True

    def model_names(self) -> list[str]:
        return self.models.known()

    def start_drain(self) -> None:
        """The server drains: not ready from now on, and no model loads or unloads (polling stops).
        Inference goes on until `refuse` (serving.server.app, RunningServer.stop)."""
        self.draining = True
        self.models.stop_polling()

    def refuse(self) -> None:
        """From now on new inference requests are refused (UNAVAILABLE), but not at once: each waits until
        `release`, when the gRPC server has stopped taking calls (serving.server.app, RunningServer.stop).

        A client told UNAVAILABLE at once would send again at once, and a call that reaches the server
        while it stops is cancelled by gRPC before it reaches us (CANCELLED: the client cannot tell
        whether it ran). Held, a client sends nothing more, and the server stops while nothing waits in
        gRPC's queue; then every held call is told UNAVAILABLE.
        """
        self.refusing = True
        self._released = asyncio.Event()
        self._last_refusal = asyncio.get_running_loop().time()  # the quiet period starts now at the earliest

    async def refused(self, time_remaining: float | None) -> None:
        """A new request while refusing: waits for `release` (or until just before its deadline), then
        raises UnavailableError."""
        self._last_refusal = asyncio.get_running_loop().time()
        timeout = None
        if time_remaining is not None:
            timeout = max(time_remaining - min(REFUSE_BEFORE_DEADLINE_S, time_remaining / 10), 0.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._released.wait(), timeout)
        raise UnavailableError("server is shutting down and takes no new requests; retry elsewhere")

    async def wait_quiet(self, quiet_s: float, limit_s: float) -> None:
        """After refuse(): waits until no new request came for quiet_s (at most limit_s)."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + limit_s
        while (now := loop.time()) < give_up:
            wait = self._last_refusal + quiet_s - now
            if wait <= 0:
                return
            await asyncio.sleep(min(wait, give_up - now))

    def release(self) -> None:
        """The gRPC server takes no more calls: every held request is refused now."""
        self._released.set()

    async def close(self) -> None:
        await self.models.close()

    # -- lookups -----------------------------------------------------------------------------------

    def resolve(self, name: str, version: str = "") -> ServedVersion:
        return self.models.resolve(name, version)

    def model_ready(self, name: str, version: str = "") -> bool:
        return not self.draining and self.models.model_ready(name, version)

    def providers(self) -> list[str]:
        seen: dict[str, None] = {}
        for versions in self.models.serving.values():
            for served in versions.values():
                seen.update(dict.fromkeys(served.loaded.providers))
        return list(seen)

    # -- RPCs --------------------------------------------------------------------------------------

    def server_metadata(self) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME,
            version=self._server_version,
            extensions=EXTENSIONS,
            parameters=_parameters({"providers": ",".join(self.providers()), "device": self._settings.device}),
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
            versions=sorted(self.models.serving[loaded.model], key=int),
            platform=PLATFORM,
            inputs=[tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in loaded.inputs],
            outputs=[tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in loaded.outputs],
            parameters=_parameters(properties),
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
        if served.policy.enabled and served.max_batch_size > 0:
            config.dynamic_batching.max_queue_delay_microseconds = served.policy.max_queue_delay_us
        policy = served.version_policy
        if policy.specific is not None:
            config.version_policy.specific.versions.extend(policy.specific)
        elif policy.latest is not None:
            config.version_policy.latest.num_versions = policy.latest
        else:
            config.version_policy.all.SetInParent()
        return pb.ModelConfigResponse(config=config)

    async def repository_index(self, ready_only: bool) -> pb.RepositoryIndexResponse:
        entry = pb.RepositoryIndexResponse.ModelIndex
        rows = await self.models.index(ready_only)
        return pb.RepositoryIndexResponse(
            models=[entry(name=m, version=v, state=state, reason=reason) for m, v, state, reason in rows]
        )

    async def load_model(self, name: str) -> None:
        """Loads, or reloads, a model (explicit model control only); raises with the reason on failure."""
        self.models.check_control("load")
        if self.draining:
            raise UnavailableError("server is shutting down; it loads no model")
        await self.models.load(name)

    async def unload_model(self, name: str) -> None:
        self.models.check_control("unload")
        if self.draining:
            raise UnavailableError("server is shutting down; it unloads no model")
        await self.models.unload(name)

    def infer(self, request: pb.ModelInferRequest, time_remaining: float | None) -> Awaitable[bytes]:
        """Runs one request through its model's batcher: await the result for its response, a serialized
        ModelInferResponse (serving.server.codec.ResponseEncoder).
        `time_remaining`: seconds to its deadline, if any. Raises what `prepare` and `run` raise."""
        if self.refusing:
            return self.refused(time_remaining)
        return self.run(self.prepare(request, time_remaining))  # one coroutine, not two, per request

    def prepare(self, request: pb.ModelInferRequest, time_remaining: float | None) -> Job:
        """Resolves the model and decodes and checks the request; raises serving.server.errors exceptions."""
        start = time.perf_counter()
        if self._routes != self.models.routes:  # a version came or went: resolve afresh
            self._resolved.clear()
            self._routes = self.models.routes
        served = self._resolved.get((request.model_name, request.model_version))
        if served is None:
            served = self._resolve_cached(request.model_name, request.model_version)
        try:
            if self.refusing:  # a stream's request: the stream ends as soon as it sees it (servicer.end_streams)
                raise UnavailableError("server is shutting down and takes no new requests; retry elsewhere")
            inputs, rows = served.decoder.decode(request)
            if self._max_request_rows is not None and rows is not None and rows > self._max_request_rows:
                self._memory.after_large_request()  # gRPC held the whole message
                raise TooLargeError(
                    f"the request has {rows} rows; this server takes at most {self._max_request_rows} per request "
                    "(--max-request-rows): split it"
                )
            outputs = served.encoder.outputs_for(request)
            deadline = None
            if time_remaining is not None:
                if time_remaining <= 0:
                    raise DeadlineExceededError("the request's deadline passed before it could run; it was not run")
                deadline = asyncio.get_running_loop().time() + time_remaining
        except Exception as exc:
            _count_failure(served.metrics, exc)
            raise
        served.jobs += 1
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
        finally:
            served.job_done()
        metrics = served.metrics
        metrics.success.count += 1
        metrics.request_seconds.observe(time.perf_counter() - job.start)
        if job.rows >= LARGE_ROWS_AT_LEAST and len(response) + job.input_bytes() >= LARGE_BYTES:
            self._memory.after_large_request()
        return response

    def _resolve_cached(self, name: str, version: str) -> ServedVersion:
        """`resolve`, remembered (for `prepare`, which looks in `_resolved` first); failures are counted."""
        try:
            served = self.resolve(name, version)
        except ServingError as exc:
            known = name in self.models.serving or name in self.models.wanted
            self._metrics.failure(name if known else UNKNOWN_MODEL, UNKNOWN_MODEL, STATUS[type(exc)].name)
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


def _parameters(values: dict[str, str]) -> dict[str, pb.InferParameter]:
    """String values as the protocol's parameters (string_param)."""
    return {key: pb.InferParameter(string_param=value) for key, value in values.items()}


def _count_failure(metrics, exc: Exception) -> None:
    metrics.failure(STATUS[type(exc)].name if isinstance(exc, ServingError) else "INTERNAL")


class MemoryReturn:
    """Gives freed memory back to the system after large requests (glibc only; elsewhere, musl or macOS,
    nothing). Two parts:

    - at start, glibc's mmap threshold is fixed at MMAP_THRESHOLD_BYTES (`mallopt`): a buffer that large
      (a large request's tensors and messages) gets pages of its own, which go back when it is freed. By
      default glibc raises the threshold to the largest buffer freed so far (up to 32 MiB), and from then
      on such buffers come from its heaps, where other allocations made meanwhile pin them: under load
      with a 1 M-row request every 5 s, RSS grew 110 -> 155 MB in 90 s, against 106 -> 114 MB fixed;
    - `malloc_trim`, on the loop, RETURN_AFTER_S after the latest large request (one timer at a time), for
      what is left in the heaps: after an 8 M-row request, 160 MB stayed behind without it.

    Trimming takes a few milliseconds, so only after requests of LARGE_BYTES or more (docs/serving.md,
    "Memory")."""

    def __init__(self) -> None:
        glibc = _glibc()
        self._trim = glibc.malloc_trim if glibc is not None else None
        if glibc is not None:
            glibc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        self._timer: asyncio.TimerHandle | None = None

    def after_large_request(self) -> None:
        if self._trim is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(RETURN_AFTER_S, self._run)

    def _run(self) -> None:
        self._timer = None
        self._trim(0)


M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1024 * 1024


def _glibc():
    """The C library when it is glibc (it has malloc_trim and mallopt), else None."""
    try:
        library = ctypes.CDLL(None)
        library.malloc_trim, library.mallopt  # noqa: B018 (both, or neither is used)
    except (OSError, AttributeError):
        return None
    return library
