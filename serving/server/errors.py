"""Serving errors and the one table that maps them to gRPC status codes (DESIGN.md, "Protocol").

Code below the RPC layer raises a `ServingError` subclass with a message a person can act on; the
`rpc_errors` decorator on each handler turns it into the status code from `STATUS`. Anything else
is a bug: it is logged with a request id and answered INTERNAL, and the server keeps serving.

Errors stay well-formed whatever a client sends (docs/serving.md, "Bad input"):
- bytes that are not the method's request message reach the handler as an `Undecodable` (the servicer's
  deserializer never raises) and are answered INVALID_ARGUMENT like any other bad request; left to gRPC,
  they would be answered UNKNOWN with a traceback in the log per request, and would end a stream;
- a client's string that a message quotes goes through `echo`, cut to MAX_ECHO_CHARS: the message travels
  in a header, and one over the client's metadata limit (8 KiB soft, 16 KiB hard by default) turns a
  NOT_FOUND into a RESOURCE_EXHAUSTED about the header;
- errors are logged at most once per LOG_EVERY_S per (RPC, status code), an INTERNAL one with its
  traceback, and those in between are counted rather than written (`Throttle`): a client sending bad
  requests in a loop cannot flood the log.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

log = logging.getLogger(__name__)

MAX_ECHO_CHARS = 256  # of a client's string quoted in an error message
LOG_EVERY_S = 10.0  # at most one log line per (RPC, status code) in this time; the others are counted


class ServingError(Exception):
    """An error the client caused or can act on; the message goes back to the client verbatim."""


class ModelNotFoundError(ServingError):
    """Unknown model or version."""


class InvalidInputError(ServingError):
    """Wrong input name or count, datatype, shape, byte length, empty batch, non-finite values."""


class TooLargeError(ServingError):
    """A message or tensor over the size limit."""


class UnavailableError(ServingError):
    """Queue full, server draining, or the model is not ready."""


class DeadlineExceededError(ServingError):
    """The request's deadline passed while it waited in the queue; it was not run."""


class LoadFailedError(ServingError):
    """A model (or some of its versions) could not be loaded; the message says why."""


class NotAllowedError(ServingError):
    """The request cannot be carried out in the server's present configuration (e.g. its model control mode)."""


class UndecodableError(ServingError):
    """The request's bytes could not be parsed as the method's request message."""


# The single place where an error becomes a status code.
STATUS: dict[type[ServingError], grpc.StatusCode] = {
    ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
    TooLargeError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    LoadFailedError: grpc.StatusCode.INVALID_ARGUMENT,
    NotAllowedError: grpc.StatusCode.FAILED_PRECONDITION,
    UndecodableError: grpc.StatusCode.INVALID_ARGUMENT,
}


def echo(text: str, quote: bool = True) -> str:
    """A client's string as an error message quotes it: in quotes (unless `quote` is False) and, when longer
    than MAX_ECHO_CHARS, cut there with its full length stated: `'aaaa…' (100000 characters)`."""
    if len(text) <= MAX_ECHO_CHARS:
        return f"'{text}'" if quote else text
    cut = text[:MAX_ECHO_CHARS] + "…"
    return f"'{cut}' ({len(text)} characters)" if quote else f"{cut} ({len(text)} characters)"


class Undecodable:
    """What the servicer's deserializer hands a handler for bytes that are not the method's request message.

    `rpc_errors`, and ModelStreamInfer per message, answer it with its `error`. The empty `id` and
    `model_name` are what a stream's in-band error echoes (serving.server.servicer)."""

    __slots__ = ("error",)
    id = ""
    model_name = ""

    def __init__(self, message_name: str, size: int, reason: str) -> None:
        self.error = UndecodableError(
            f"the request ({size} bytes) could not be parsed as {message_name}: {echo(reason, quote=False)}"
        )


class Throttle:
    """Per key, at most one log line per `every_s`; the occurrences in between are counted.

    `admit(key, note)` says whether to write a line now, with the number of occurrences held back since the
    key's previous line (None: this one is held back, and counted). When the first of a period is held
    back, a timer on the running event loop calls `summary(key, count, note of the latest)` at the end of
    the period, so that a burst's count is written even when nothing follows it; without a running loop
    the count waits for the key's next line. Keys come from a small set (RPC names, status codes,
    exception types); the table starts afresh if it ever grows past MAX_KEYS."""

    MAX_KEYS = 1024

    def __init__(self, every_s: float, summary: Callable[[tuple, int, str], None], clock=time.monotonic) -> None:
        self._every = every_s
        self._summary = summary
        self._clock = clock
        self._periods: dict[tuple, _Period] = {}

    def admit(self, key: tuple, note: str = "") -> int | None:
        now = self._clock()
        period = self._periods.get(key)
        if period is None:
            if len(self._periods) >= self.MAX_KEYS:
                self._periods.clear()
            self._periods[key] = _Period(now)
            return 0
        if now - period.start >= self._every:
            held, period.start, period.held = period.held, now, 0
            return held
        period.held += 1
        period.note = note
        if period.loop is None or period.loop.is_closed():  # no timer pending (or its loop is gone)
            try:
                period.loop = asyncio.get_running_loop()
            except RuntimeError:
                return None
            period.loop.call_later(period.start + self._every - now, self._flush, key, period)
        return None

    def _flush(self, key: tuple, period: _Period) -> None:
        period.loop = None
        if period.held and self._periods.get(key) is period:
            held, period.start, period.held = period.held, self._clock(), 0
            self._summary(key, held, period.note)


class _Period:
    """A key's current period: when its latest line was written, and what has been held back since."""

    __slots__ = ("start", "held", "note", "loop")

    def __init__(self, start: float) -> None:
        self.start = start
        self.held = 0
        self.note = ""  # of the latest held back
        self.loop: asyncio.AbstractEventLoop | None = None  # the loop whose timer is to write the summary


def _summarize(key: tuple, held: int, note: str) -> None:
    rpc, code = key[0], key[1]
    level = logging.ERROR if code == "INTERNAL" else logging.INFO
    line = "event=errors_suppressed rpc=%s code=%s count=%d period_s=%g latest=%s"
    log.log(level, line, rpc, code, held, LOG_EVERY_S, note)


_throttle = Throttle(LOG_EVERY_S, _summarize)


def status_of(exc: BaseException, rpc: str, request_id: str = "") -> tuple[grpc.StatusCode, str]:
    """The status code and client message for an exception; logged here, at most once per LOG_EVERY_S per
    (RPC, status code): ServingErrors at INFO, unexpected ones at ERROR with their traceback."""
    code = STATUS.get(type(exc))
    if code is not None:
        message = str(exc)
        held = _throttle.admit((rpc, code.name), repr(message))
        if held is not None:
            log.info("event=request_error rpc=%s code=%s suppressed=%d message=%r", rpc, code.name, held, message)
        return code, message
    request_id = echo(request_id, quote=False) if request_id else uuid.uuid4().hex[:12]
    error = echo(repr(exc), quote=False)
    held = _throttle.admit((rpc, "INTERNAL", type(exc).__name__), f"request_id={request_id} error={error}")
    if held is not None:
        line = "event=internal_error rpc=%s request_id=%s suppressed=%d error=%s"
        log.error(line, rpc, request_id, held, error, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (request id {request_id}); the server log has the details"


Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[object, Request, grpc.aio.ServicerContext], Awaitable[Response]]


def _over(context: grpc.aio.ServicerContext) -> bool:
    """Whether the call has ended already: cancelled by its client, or past its deadline."""
    remaining = context.time_remaining()
    return context.cancelled() or context.done() or (remaining is not None and remaining <= 0)


def rpc_errors(handler: Handler) -> Handler:
    """Decorates a unary RPC method: ServingErrors become their status, anything else INTERNAL; a request
    that could not be decoded (`Undecodable`) is answered INVALID_ARGUMENT without reaching the method.

    The method returns an awaitable of its response (a coroutine function, or a plain function that returns
    one: the request path saves a coroutine that way); errors raised while calling it count the same."""
    rpc = handler.__name__

    @functools.wraps(handler)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            if type(request) is Undecodable:  # the one check a decoded request pays for this
                raise request.error
            response = await handler(self, request, context)
            if not _over(context):
                return response
        except Exception as exc:
            code, message = status_of(exc, rpc, getattr(request, "id", ""))
            if not _over(context):
                await context.abort(code, message)
        # The call ended (its deadline passed, or the client went): nothing can be sent on it, and aborting it
        # would fail inside gRPC. Ending the handler as a cancelled one is what gRPC expects then.
        raise asyncio.CancelledError

    return wrapper
