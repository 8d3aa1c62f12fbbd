"""Domain errors, the one table that maps them to gRPC status codes, and the wrapper every RPC method wears.

Domain code raises `InvalidArgument("k", "must be in [1, 100], got 0")` and never touches status codes.
`rpc_method` turns those errors into a status code plus details on Ray Serve's `RayServegRPCContext`
and returns an empty response: Ray 2.60 copies the code and details set on that context to the client
(`RayServegRPCContext._set_on_grpc_context` in ray/serve/grpc_util.py), so no exception crosses the proxy.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol, Sequence, TypeVar

import grpc
from google.protobuf.message import Message

from seqrank.serving import wire

logger = logging.getLogger(__name__)

# Attribute an ingress instance sets (in __init__) to plug auth and metrics into `rpc_method`.
HOOKS_ATTRIBUTE = "rpc_hooks"
INTERNAL_ERROR_DETAILS = "internal error; see the server log for this request"
# Status details travel in HTTP/2 trailers, which clients cap (8 KiB by default in gRPC) and Ray's proxy does not
# truncate for codes set on the context: details are capped here, and echoed request values by `shown`.
MAX_DETAILS_CHARS = 1024
MAX_SHOWN_CHARS = 64


def shown(value: str) -> str:
    """repr of a caller's string for an error message, cut to MAX_SHOWN_CHARS characters with its length noted."""
    if len(value) <= MAX_SHOWN_CHARS:
        return repr(value)
    return f"{value[:MAX_SHOWN_CHARS]!r}... ({len(value)} characters)"


def status_details(error: "ServingError") -> str:
    """`subject: reason`, at most MAX_DETAILS_CHARS characters."""
    details = f"{error.subject}: {error.reason}"
    return details if len(details) <= MAX_DETAILS_CHARS else details[:MAX_DETAILS_CHARS - 3] + "..."


class ServingError(Exception):
    """Base of the domain errors: `subject` is the request field (or dependency) at fault, `reason` says why."""

    def __init__(self, subject: str, reason: str) -> None:
        super().__init__(f"{subject}: {reason}")
        self.subject = subject
        self.reason = reason

    def __reduce__(self):
        # Errors raised in a downstream replica are pickled back to the ingress; the default reduce would call
        # __init__ with the one formatted message and fail.
        return type(self), (self.subject, self.reason)


class InvalidArgument(ServingError):
    """A request field is malformed or out of range; the reason states the allowed range."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(field, reason)
        self.field = field


class NotFound(ServingError):
    """A named entity (user, item, model) does not exist."""


class ResourceExhausted(ServingError):
    """A quota or capacity limit was hit; the client may retry later."""


class Unavailable(ServingError):
    """A dependency (history store, model) cannot serve right now; the client may retry."""


class Unauthenticated(ServingError):
    """The call lacks valid credentials."""


class FailedPrecondition(ServingError):
    """The request is valid but conflicts with server state (e.g. an idempotency key reused with other data)."""


# The one mapping from domain errors to transport codes.
STATUS_CODE_OF: dict[type[ServingError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_code_of(error: ServingError) -> grpc.StatusCode:
    """Status code for a domain error, looked up along its class hierarchy (subclasses inherit the code)."""
    for cls in type(error).__mro__:
        if cls in STATUS_CODE_OF:
            return STATUS_CODE_OF[cls]
    raise TypeError(f"{type(error).__name__} has no entry in STATUS_CODE_OF")


@dataclass(frozen=True)
class RpcOutcome:
    """What the wrapper observed for one call; handed to `RpcHooks.observe` (metrics)."""

    method: str
    code: grpc.StatusCode
    duration_s: float


class GrpcContext(Protocol):
    """The part of ray.serve.grpc_util.RayServegRPCContext the wrapper uses."""

    def set_code(self, code: grpc.StatusCode) -> None: ...

    def set_details(self, details: str) -> None: ...

    def invocation_metadata(self) -> Sequence[tuple[str, str]]: ...


@dataclass(frozen=True)
class RpcHooks:
    """Optional per-ingress hooks. `authenticate` raises Unauthenticated; `observe` must not raise."""

    authenticate: Callable[[Sequence[tuple[str, str]]], None] | None = None
    observe: Callable[[RpcOutcome], None] | None = None


NO_HOOKS = RpcHooks()

RequestT = TypeVar("RequestT", bound=Message)
ResponseT = TypeVar("ResponseT", bound=Message)
RpcMethod = Callable[[Any, Message, GrpcContext], Awaitable[ResponseT]]


def _observe(hooks: RpcHooks, method: str, code: grpc.StatusCode, started: float) -> None:
    if hooks.observe is None:
        return
    try:
        hooks.observe(RpcOutcome(method=method, code=code, duration_s=time.perf_counter() - started))
    except Exception:  # a metrics failure must never fail the request
        logger.exception("rpc observe hook failed for %s", method)


def decode_request(request_type: type[RequestT], request: bytes | RequestT) -> RequestT:
    """The request message: decoded here when it arrives as bytes (serving/servicers.py registers the services
    without a deserializer), passed through when an in-process caller already holds the message."""
    if isinstance(request, Message):
        return request
    try:
        return wire.decode(request_type, request)
    except wire.WireError as error:
        raise InvalidArgument(error.field, error.reason) from None


def rpc_method(
    request_type: type[RequestT], response_type: type[ResponseT], public: bool = False
) -> Callable[[RpcMethod[ResponseT]], RpcMethod[ResponseT]]:
    """Decorates `async def Method(self, request, grpc_context)` of a Serve ingress.

    Unless `public` (health checks: probes carry no credentials), `self.rpc_hooks.authenticate` sees the call's
    metadata first and its Unauthenticated error answers the call. Only then are the request bytes decoded into
    `request_type`: bytes that are no such message answer INVALID_ARGUMENT naming the first bad field, counted
    like any other outcome.
    Domain errors set their status code and message on `grpc_context` and return `response_type()`; any other
    exception is logged with its traceback and answered INTERNAL with a generic message. Cancellation
    (client deadline, proxy timeout) propagates. Every outcome is reported to `self.rpc_hooks.observe`.
    """

    def decorate(method: RpcMethod[ResponseT]) -> RpcMethod[ResponseT]:
        name = method.__name__

        @functools.wraps(method)  # keeps the `grpc_context` parameter visible to Ray's signature check
        async def wrapper(self: Any, request: Message, grpc_context: GrpcContext) -> ResponseT:
            hooks: RpcHooks = getattr(self, HOOKS_ATTRIBUTE, NO_HOOKS)
            started = time.perf_counter()
            try:
                if hooks.authenticate is not None and not public:
                    hooks.authenticate(grpc_context.invocation_metadata())
                response = await method(self, decode_request(request_type, request), grpc_context)
            except ServingError as error:
                code = status_code_of(error)
                logger.debug("%s -> %s: %s", name, code.name, error)
                grpc_context.set_code(code)
                # Not str(error): an error raised in a downstream replica arrives as Ray's RayTaskError subclass,
                # whose str() is a traceback.
                grpc_context.set_details(status_details(error))
                _observe(hooks, name, code, started)
                return response_type()
            except asyncio.CancelledError:
                _observe(hooks, name, grpc.StatusCode.CANCELLED, started)
                raise
            except Exception:
                logger.exception("%s failed with an unexpected error", name)
                grpc_context.set_code(grpc.StatusCode.INTERNAL)
                grpc_context.set_details(INTERNAL_ERROR_DETAILS)
                _observe(hooks, name, grpc.StatusCode.INTERNAL, started)
                return response_type()
            _observe(hooks, name, grpc.StatusCode.OK, started)
            return response

        return wrapper

    return decorate
