"""The models being served and their lifecycle: load, unload and hot-swap versions while requests run.

Model control modes, as Triton's (`--model-control-mode`):
- none: every model of the repository is loaded at start-up, and nothing changes after that;
- poll: the same at start-up, then the repository is scanned every `--repository-poll-s`: new version
  folders load, removed ones unload, a changed model.onnx or config.pbtxt reloads (hidden folders,
  such as the trainer's `.1.xxxx.tmp` staging ones, are never looked at);
- explicit: only the models named by `--load-model` load at start-up; after that, models load and
  unload through the repository RPCs.

A version goes LOADING -> READY, or -> UNAVAILABLE with the reason when it fails to load; UNLOADING ->
UNAVAILABLE ("unloaded") when it leaves. A swap never drops a request:
- a new version is loaded and warmed up before anything serves it;
- it then takes the requests for "latest" at once: the maps that route requests change in one step of
  the event loop;
- a version that leaves is taken out of those maps first, then finishes every request already routed
  to it (prepared, queued or running), and only then unloads and releases its sessions;
- a version that fails to load changes nothing that serves, and neither does a model whose every
  wanted version failed: its old versions go on serving.

Everything here runs on the server's event loop; loading a version's sessions runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from serving.devices import DeviceUnavailableError
from serving.protocol import TensorSpec
from serving.runtime import SessionSettings
from serving.server import codec
from serving.server.batching import Batcher, BatchPolicy, Coalescer
from serving.server.errors import LoadFailedError, ModelNotFoundError, NotAllowedError, UnavailableError, echo
from serving.server.metrics import Metrics, ModelMetrics
from serving.server.modelconfig import ALL_VERSIONS, VersionPolicy
from serving.server.repository import (
    LoadedVersion,
    ModelFolder,
    VersionPath,
    load_version,
    model_names,
    rows_within,
    scan_model,
)

log = logging.getLogger(__name__)

MODES = ("none", "poll", "explicit")
READY, UNAVAILABLE, LOADING, UNLOADING = "READY", "UNAVAILABLE", "LOADING", "UNLOADING"


@dataclass
class ServedVersion:
    """A loaded model version with its batcher and metrics, and how many requests it holds."""

    loaded: LoadedVersion
    batcher: Batcher
    metrics: ModelMetrics
    output_names: tuple[str, ...]
    max_batch_size: int  # reported in ModelConfig: 0 when the model is served without batching
    decoder: codec.InputDecoder
    encoder: codec.ResponseEncoder
    row_bytes: int | None  # bytes of all outputs per row when every output has a batch axis and fixed other dims
    policy: BatchPolicy
    version_policy: VersionPolicy
    signature: tuple | None  # the model.onnx and config.pbtxt it was loaded from (inode, size, mtime)
    jobs: int = 0  # requests routed to it and not answered yet
    retiring: asyncio.Event | None = field(default=None, repr=False)  # set once it leaves and holds none

    def job_done(self) -> None:
        self.jobs -= 1
        if self.retiring is not None and self.jobs <= 0:
            self.retiring.set()


@dataclass
class Status:
    state: str
    reason: str = ""
    signature: tuple | None = None  # the files a failed load was tried on: not retried by polling until they change


class Models:
    def __init__(
        self,
        repository: Path,
        settings: SessionSettings,
        instances: int,
        policy: BatchPolicy,
        metrics: Metrics,
        inline_max_s: float,
        mode: str = "none",
        load_models: tuple[str, ...] = (),
        poll_s: float = 15.0,
        retire_timeout_s: float = 30.0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"model control mode {mode!r} is not one of {', '.join(MODES)}")
        self.repository = repository
        self.mode = mode
        self._settings = settings
        self._instances = instances
        self._policy = policy
        self._metrics = metrics
        self._inline_max_s = inline_max_s
        self._load_models = load_models
        self._poll_s = poll_s
        self._retire_timeout_s = retire_timeout_s
        self.serving: dict[str, dict[str, ServedVersion]] = {}  # model -> version -> READY version
        self.latest: dict[str, str] = {}
        self.status: dict[tuple[str, str], Status] = {}  # every version the server has known
        self.problems: dict[str, str] = {}  # model -> why none of its versions can be served
        self.wanted: set[str] = set()  # the models that are to be served
        self.changed = asyncio.Event()  # set whenever what is ready changes (health follows it)
        self.routes = 0  # counts the changes of routing: caches of resolved names start afresh on one
        self.started = False
        self._signatures: dict[str, tuple | None] = {}  # model -> config.pbtxt signature when last loaded
        self._locks: dict[str, asyncio.Lock] = {}
        self._coalescer = Coalescer()  # shared by every model's batcher: one end-of-turn check for all
        self._poller: asyncio.Task | None = None
        self._retiring: set[asyncio.Task] = set()
        self._tried: dict[tuple[str, str], tuple] = {}  # (model, version) -> files a failed reload was tried on

    # -- start, stop -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Loads what the mode loads at start-up; in poll mode, then polls. Raises DeviceUnavailableError
        (--device cuda without CUDA: it concerns every model) and FileNotFoundError (no repository)."""
        names = await asyncio.to_thread(model_names, self.repository)
        if self.mode == "explicit":
            names = list(self._load_models)
        elif not names:
            self.problems["(repository)"] = f"no models in {self.repository}"
        for name in names:
            try:
                await self.load(name, starting=True)
            except LoadFailedError:
                pass  # each failure was logged where it happened, and the index has it
            except ModelNotFoundError as exc:
                self.problems[name] = str(exc)
                log.error("event=model_load_failed model=%s reason=%r", name, str(exc))
        self.started = True
        self.changed.set()
        if self.mode == "poll":
            self._poller = asyncio.ensure_future(self._poll())

    def stop_polling(self) -> None:
        """The server drains: the repository is polled no more (a load under way finishes)."""
        if self._poller is not None:
            self._poller.cancel()

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*(served.batcher.close() for served in self._all()))

    def _all(self) -> list[ServedVersion]:
        return [served for versions in self.serving.values() for served in versions.values()]

    # -- what is served ----------------------------------------------------------------------------

    def resolve(self, name: str, version: str = "") -> ServedVersion:
        """The version that serves a request for `name` (and `version`; empty: the latest)."""
        versions = self.serving.get(name)
        if not versions:
            if not self.started:  # the port is open while the models load: a retry will find them
                raise UnavailableError("the server is still loading its models; retry")
            if name in self.problems or any(
                s.state == UNAVAILABLE and s.reason != "unloaded" and m == name for (m, _), s in self.status.items()
            ):
                raise UnavailableError(f"model '{name}' failed to load; the server log and RepositoryIndex say why")
            if name in self.wanted or any(m == name for m, _ in self.status):
                raise ModelNotFoundError(f"model '{name}' is not loaded")
            raise ModelNotFoundError(f"unknown model {echo(name)}; models: {sorted(self.serving)}")
        served = versions.get(version or self.latest[name])
        if served is None:
            status = self.status.get((name, version))
            if status is not None and status.state == UNAVAILABLE and status.reason != "unloaded":
                raise UnavailableError(f"model '{name}' version '{version}' failed to load: {status.reason}")
            raise ModelNotFoundError(
                f"model '{name}' has no version {echo(version)}; versions: {sorted(versions, key=int)}"
            )
        return served

    def model_ready(self, name: str, version: str = "") -> bool:
        try:
            self.resolve(name, version)
        except (ModelNotFoundError, UnavailableError):
            return False
        return True

    @property
    def failures(self) -> dict[str, str]:
        """Why something that is to be served is not: "model" or "model/version" -> the reason."""
        failed = dict(self.problems)
        for (model, version), status in self.status.items():
            if model in self.wanted and status.state == UNAVAILABLE and status.reason != "unloaded":
                failed[f"{model}/{version}"] = status.reason
        return failed

    def all_wanted_ready(self) -> bool:
        """Every model that is to be served, or that could not be read, has a version ready (a repository
        without models has none)."""
        return all(self.serving.get(name) for name in self.wanted | set(self.problems))

    def model_serving(self, name: str) -> bool:
        """The model has a version ready (grpc.health.v1 says SERVING for it)."""
        return bool(self.serving.get(name))

    def known(self) -> list[str]:
        """Every model the server serves or tried to: the names health reports on."""
        return sorted(self.wanted | set(self.serving) | {m for m, _ in self.status} - {"(repository)"})

    async def index(self, ready_only: bool = False) -> list[tuple[str, str, str, str]]:
        """(model, version, state, reason) of every version in the repository or known to the server."""
        rows = await asyncio.to_thread(self._on_disk)
        for name, problem in self.problems.items():
            rows[(name, "")] = (UNAVAILABLE, problem)
        for key, status in self.status.items():
            rows[key] = (status.state, status.reason)
        return [
            (model, version, state, reason)
            for (model, version), (state, reason) in sorted(rows.items(), key=lambda kv: (kv[0][0], _number(kv[0][1])))
            if not ready_only or state == READY
        ]

    # -- load, unload ------------------------------------------------------------------------------

    async def load(self, name: str, starting: bool = False) -> None:
        """Loads (or reloads) a model: the versions its policy wants and that are not served as they are on
        disk load; then the versions it no longer wants unload. Raises ModelNotFoundError when the
        repository has no such model, and LoadFailedError (with the reasons) when a version failed."""
        async with self._lock(name):
            try:
                folder = await asyncio.to_thread(scan_model, self.repository, name)
            except OSError as exc:  # a name the file system cannot look up (too long): no such folder
                if exc.errno != errno.ENAMETOOLONG:
                    raise
                folder = None
            if folder is None:
                raise ModelNotFoundError(f"no model {echo(name)} in the repository {self.repository}")
            self.wanted.add(name)
            if folder.problem is not None:
                self.problems[name] = folder.problem
                self._metrics.model_load(name, "", ok=False)
                log.error("event=model_load_failed model=%s reason=%r", name, folder.problem)
                self.changed.set()
                raise LoadFailedError(f"cannot load model '{name}': {folder.problem}")
            self.problems.pop(name, None)
            config_changed = self._signatures.get(name, folder.config_signature) != folder.config_signature
            failures = []
            for where in folder.versions:
                current = self.serving.get(name, {}).get(where.version)
                if current is not None and current.signature == (where.signature, folder.config_signature):
                    continue
                reason = await self._load_version(folder, where, starting)
                if reason is not None:
                    failures.append(f"version {where.version}: {reason}")
            self._signatures[name] = folder.config_signature
            chosen = {where.version for where in folder.versions}
            if any(v in chosen for v in self.serving.get(name, {})):  # never leave a model with nothing to serve
                for version in [v for v in self.serving.get(name, {}) if v not in chosen]:
                    await self._retire(name, version)
            if failures:
                raise LoadFailedError(f"cannot load model '{name}': " + "; ".join(failures))
            log.info(
                "event=model_reconciled model=%s versions=%s config_changed=%s",
                name,
                ",".join(sorted(self.serving.get(name, {}), key=int)),
                config_changed,
            )

    async def unload(self, name: str) -> None:
        """Unloads every version of a model, each once it has answered what it holds."""
        async with self._lock(name):
            if name not in self.wanted and name not in self.serving:
                raise ModelNotFoundError(f"model {echo(name)} is not loaded")
            self.wanted.discard(name)
            self.problems.pop(name, None)
            for version in list(self.serving.get(name, {})):
                await self._retire(name, version)
            self.changed.set()

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def _load_version(self, folder: ModelFolder, where: VersionPath, starting: bool) -> str | None:
        """Loads one version and puts it in service; the reason when it failed (nothing serving changes)."""
        key = (where.model, where.version)
        replaced = self.serving.get(where.model, {}).get(where.version)
        if replaced is None:
            self.status[key] = Status(LOADING)
        config = folder.settings
        settings = (
            self._settings if config is None or config.device is None else replace(self._settings, device=config.device)
        )
        instances = (config.instances if config is not None else None) or self._instances
        try:
            loaded = await asyncio.to_thread(load_version, where, settings, instances, config)
            policy = self._batch_policy(folder, loaded)
            inline = await asyncio.to_thread(
                rows_within, loaded, policy.max_batch_size if policy.enabled else 1, self._inline_max_s
            )
        except DeviceUnavailableError:
            if starting:
                raise
            reason = f"--device {settings.device} cannot be had"
            self._failed(where, reason, replaced, (where.signature, folder.config_signature))
            return reason
        except Exception as exc:
            reason = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
            self._failed(where, reason, replaced, (where.signature, folder.config_signature))
            return reason
        served = self._serve(loaded, policy, folder, where, *inline)
        self.serving.setdefault(where.model, {})[where.version] = served
        self._route(where.model)
        self.status[key] = Status(READY)
        self._metrics.model_load(where.model, where.version, ok=True)
        if config is not None and config.ignored:
            log.warning("event=config_ignored model=%s fields=%s", where.model, ",".join(config.ignored))
        if replaced is not None:
            self._start_retiring(replaced, reloaded=True)
        self.changed.set()
        return None

    def _failed(self, where: VersionPath, reason: str, replaced: ServedVersion | None, signature: tuple) -> None:
        log.error("event=model_load_failed model=%s version=%s reason=%r", where.model, where.version, reason)
        self._metrics.model_load(where.model, where.version, ok=False)
        if replaced is None:  # a version already served goes on serving as it was
            self.status[(where.model, where.version)] = Status(UNAVAILABLE, reason, signature)
        else:
            self._tried[(where.model, where.version)] = signature
        self.changed.set()

    def _batch_policy(self, folder: ModelFolder, loaded: LoadedVersion) -> BatchPolicy:
        """The flags' batching, with what the model's config.pbtxt sets; none for a model without a batch axis."""
        config = folder.settings
        if not loaded.batchable or (config is not None and (config.max_batch_size == 0 or not config.batching)):
            return BatchPolicy(max_batch_size=1, max_queue_size=self._policy.max_queue_size, enabled=False)
        if config is None:
            return self._policy
        return BatchPolicy(
            max_batch_size=config.max_batch_size or self._policy.max_batch_size,
            max_queue_delay_us=config.max_queue_delay_us or 0,
            max_queue_size=self._policy.max_queue_size,
            enabled=self._policy.enabled,
        )

    def _serve(
        self,
        loaded: LoadedVersion,
        policy: BatchPolicy,
        folder: ModelFolder,
        where: VersionPath,
        inline_rows: int,
        inline_s: float,
    ) -> ServedVersion:
        """A loaded version with a running batcher. Batches of up to `inline_rows` rows (those that run within
        --inline-max-us, `inline_s` for the largest: see `rows_within`) run on the event loop; larger ones in
        the instance threads."""
        batch_rows = policy.max_batch_size if policy.enabled else 1
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
        return ServedVersion(
            loaded,
            batcher,
            metrics,
            outputs,
            self._reported_max_batch(folder, loaded),
            codec.InputDecoder(loaded.inputs),
            codec.ResponseEncoder(loaded.model, loaded.version, loaded.outputs),
            _row_bytes(loaded.outputs) if loaded.batchable else None,
            policy,
            folder.settings.version_policy if folder.settings is not None else ALL_VERSIONS,
            (where.signature, folder.config_signature),
        )

    def _reported_max_batch(self, folder: ModelFolder, loaded: LoadedVersion) -> int:
        """ModelConfig's max_batch_size: the config.pbtxt's, or the flag's for a model with a batch axis."""
        if folder.settings is not None:
            return folder.settings.max_batch_size or 0
        return self._policy.max_batch_size if loaded.batchable else 0

    def _route(self, model: str) -> None:
        """Requests for the model's latest go to its highest ready version from now on."""
        self.routes += 1
        versions = self.serving.get(model)
        if versions:
            self.latest[model] = max(versions, key=int)
        else:
            self.serving.pop(model, None)
            self.latest.pop(model, None)
        self._metrics.loaded_versions(model, len(versions or ()))

    async def _retire(self, model: str, version: str) -> None:
        """Takes a version out of service, then waits until it has answered what it holds, and unloads it."""
        served = self.serving[model].pop(version)
        self.status[(model, version)] = Status(UNLOADING)
        self._route(model)
        self.changed.set()
        await self._unload(served, reloaded=False)

    def _start_retiring(self, served: ServedVersion, reloaded: bool) -> None:
        task = asyncio.ensure_future(self._unload(served, reloaded))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _unload(self, served: ServedVersion, reloaded: bool) -> None:
        loaded = served.loaded
        served.retiring = asyncio.Event()
        if served.jobs <= 0:
            served.retiring.set()
        try:
            await asyncio.wait_for(served.retiring.wait(), self._retire_timeout_s)
        except TimeoutError:
            log.warning("event=unload_timeout model=%s version=%s jobs=%d", loaded.model, loaded.version, served.jobs)
        await served.batcher.drain()
        await served.batcher.close()
        self._metrics.model_unload(served.metrics, loaded.model, loaded.version, loaded.provider)
        loaded.sessions.clear()  # the sessions, and the memory ONNX Runtime holds for them, go with the last reference
        if not reloaded and (loaded.model, loaded.version) not in {
            (m, v) for m, versions in self.serving.items() for v in versions
        }:
            self.status[(loaded.model, loaded.version)] = Status(UNAVAILABLE, "unloaded")
        log.info("event=model_unloaded model=%s version=%s reloaded=%s", loaded.model, loaded.version, reloaded)
        self.changed.set()

    # -- poll --------------------------------------------------------------------------------------

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            try:
                await self.poll_once()
            except Exception:  # a bad turn must not end polling; the next one tries again
                log.exception("event=poll_failed")

    async def poll_once(self) -> None:
        """One scan of the repository: models that appeared or changed load, models that went unload."""
        on_disk = set(await asyncio.to_thread(_safe, model_names, self.repository))
        for name in sorted(on_disk):
            folder = await asyncio.to_thread(scan_model, self.repository, name)
            if folder is not None and self._differs(folder):
                with contextlib.suppress(ModelNotFoundError, LoadFailedError):  # logged, and in the index
                    await self.load(name)
        for name in sorted(self.wanted - on_disk):
            await self.unload(name)

    def _differs(self, folder: ModelFolder) -> bool:
        """Whether loading the model now would change what is served. Files that failed to load are not
        tried again until they change."""
        if folder.name not in self.wanted:
            return True
        if folder.problem is not None:
            return folder.problem != self.problems.get(folder.name)
        served = self.serving.get(folder.name, {})
        wanted = {where.version: (where.signature, folder.config_signature) for where in folder.versions}
        if set(served) - set(wanted):
            return True
        for version, signature in wanted.items():
            current = served.get(version)
            if current is not None and current.signature == signature:
                continue
            status = self.status.get((folder.name, version))
            failed = status is not None and status.state == UNAVAILABLE and status.signature == signature
            if not failed and self._tried.get((folder.name, version)) != signature:
                return True
        return False

    def check_control(self, what: str) -> None:
        """Raises NotAllowedError unless the repository RPCs may `what` (load or unload) models."""
        if self.mode != "explicit":
            raise NotAllowedError(
                f"cannot {what} models: the model control mode is {self.mode}; start the server with "
                "--model-control-mode explicit to load and unload models through the API"
            )

    def _on_disk(self) -> dict[tuple[str, str], tuple[str, str]]:
        """Every version folder of the repository, as not loaded (in a thread: it reads the disk)."""
        rows = {}
        for name in _safe(model_names, self.repository):
            folder = scan_model(self.repository, name)
            for version in folder.on_disk if folder is not None else ():
                rows[(name, version)] = (UNAVAILABLE, "not loaded")
        return rows


def _safe(function, *args):
    try:
        return function(*args)
    except OSError:
        return []


def _number(version: str) -> int:
    return int(version) if version.isdigit() else -1


def _row_bytes(outputs: tuple[TensorSpec, ...]) -> int | None:
    """Bytes per row of all outputs together, when every dimension but the batch axis is fixed."""
    if any(-1 in spec.shape[1:] for spec in outputs):
        return None
    return sum(spec.dtype.itemsize * math.prod(spec.shape[1:]) for spec in outputs)
