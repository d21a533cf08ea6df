"""Serving errors and the one table that maps them to gRPC status codes (DESIGN.md, "Protocol").

Code below the RPC layer raises a `ServingError` subclass with a message a person can act on; the
`rpc_errors` decorator on each handler turns it into the status code from `STATUS`. Anything else
is a bug: it is logged with a request id and answered INTERNAL, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

log = logging.getLogger(__name__)


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


# The single place where an error becomes a status code.
STATUS: dict[type[ServingError], grpc.StatusCode] = {
    ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
    TooLargeError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    LoadFailedError: grpc.StatusCode.INVALID_ARGUMENT,
    NotAllowedError: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_of(exc: BaseException, rpc: str, request_id: str = "") -> tuple[grpc.StatusCode, str]:
    """The status code and client message for an exception; unexpected ones are logged here."""
    code = STATUS.get(type(exc))
    if code is not None:
        return code, str(exc)
    request_id = request_id or uuid.uuid4().hex[:12]
    log.error("event=internal_error rpc=%s request_id=%s error=%r", rpc, request_id, exc, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (request id {request_id}); the server log has the details"


Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[object, Request, grpc.aio.ServicerContext], Awaitable[Response]]


def _over(context: grpc.aio.ServicerContext) -> bool:
    """Whether the call has ended already: cancelled by its client, or past its deadline."""
    remaining = context.time_remaining()
    return context.cancelled() or context.done() or (remaining is not None and remaining <= 0)


def rpc_errors(handler: Handler) -> Handler:
    """Decorates a unary RPC method: ServingErrors become their status, anything else INTERNAL.

    The method returns an awaitable of its response (a coroutine function, or a plain function that returns
    one: the request path saves a coroutine that way); errors raised while calling it count the same."""
    rpc = handler.__name__

    @functools.wraps(handler)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
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
