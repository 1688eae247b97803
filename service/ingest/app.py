"""The HTTP ingest application: webhook routes, probes and metrics (the process that serves
it is :mod:`service.ingest.server`).

A request with several faults is answered by the first of 404, 405, 413, 415, 401 (or 429),
400. Per-order secrets are checked on the raw bytes before anything decodes the body; a
provider that signs with a merchant secret inside the body checks its signature on the exact
signed bytes first (its module in :mod:`service.providers` knows how). Routes name no provider:
they dispatch through the registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, final

import orjson
import structlog
from aiohttp import HttpVersion11, StreamReader, hdrs, web

from schemas.events import InvoiceEvent
from service import errors
from service.ingest.metrics import IngestMetrics
from service.ingest.publisher import Publisher
from service.ingest.secrets import FailureLimiter, verify_secret
from service.ingest.spool import Spool, drain_forever
from service.kafka import ensure_topics
from service.logs import bind_event, bind_request, request_logger
from service.metrics import CONTENT_TYPE
from service.providers import MERCHANT_SIGNED, PER_ORDER, PROVIDERS
from service.readiness import Readiness
from service.settings import Settings
from service.tasks import cancel_and_wait

log = structlog.get_logger("payhook.http")
access = request_logger("payhook.http")


@final
@dataclass(slots=True)
class Shutdown:
    """When a graceful shutdown must be over (the event loop's clock), once one started."""

    deadline: float | None = None


SETTINGS: Final = web.AppKey("settings", Settings)
METRICS: Final = web.AppKey("metrics", IngestMetrics)
PUBLISHER: Final = web.AppKey("publisher", Publisher)
SPOOL: Final = web.AppKey("spool", Spool)
LIMITER: Final = web.AppKey("limiter", FailureLimiter)
READINESS: Final = web.AppKey("readiness", Readiness)
SHUTDOWN: Final = web.AppKey("shutdown", Shutdown)

WEBHOOK_PREFIX: Final = "/v1/webhooks/"
_JSON: Final = "application/json"
_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_HTTP_CODES: Final = {
    404: errors.NotFound.code,
    405: errors.MethodNotAllowed.code,
    413: errors.PayloadTooLarge.code,
    415: errors.UnsupportedMediaType.code,
}


def _json(
    status: int, payload: dict[str, str], headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(payload), content_type=_JSON, headers=headers
    )


def _error_response(exc: errors.PayhookError) -> web.Response:
    headers: dict[str, str] | None = None
    if isinstance(exc, errors.Unavailable):
        headers = {"Retry-After": str(exc.retry_after)}
    elif isinstance(exc, errors.MethodNotAllowed):
        headers = {"Allow": exc.allow}
    return _json(exc.status, {"error": exc.code, "detail": exc.detail}, headers)


# --- request handling -------------------------------------------------------------------------


def _require(request: web.Request, *methods: str) -> None:
    """405 for any other method: every route takes them all, so the answer is ours."""
    if request.method not in methods:
        raise errors.MethodNotAllowed(
            f"{request.method} is not allowed here; use {methods[0]}", ", ".join(methods)
        )


def _check_headers(request: web.Request, limit: int) -> None:
    """What the headers alone refuse, before any secret is checked: a declared length past the
    limit (413), then a media type other than JSON (415)."""
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(limit)
    if request.headers.get("Content-Type") != _JSON and request.content_type != _JSON:
        raise errors.UnsupportedMediaType("the body must be application/json")


async def _read_body(request: web.Request, settings: Settings) -> bytes:
    """The body, read no further than the limit (413) and within ``body_timeout``: past it
    the connection is closed unanswered. A body that came whole with the headers (nearly
    every webhook) is taken as it is, without a timer."""
    limit = settings.max_body_bytes
    stream = request.content
    if stream.is_eof():
        body = stream.read_nowait()
    else:  # chunked, or a body still arriving
        if _expectation(request) == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # as aiohttp's own: the answer has not begun
        try:
            async with asyncio.timeout(settings.body_timeout):
                body = await _read_rest(stream, limit)
        except TimeoutError:
            request.protocol.force_close()
            raise errors.BodyTimeout(
                f"the body did not arrive within {settings.body_timeout:g} s"
            ) from None
        except ConnectionError:  # the client hung up (aiohttp sets ConnectionResetError)
            raise errors.ClientGone("the client closed the connection") from None
    if len(body) > limit:
        raise _too_large(limit)
    return body


def _expectation(request: web.Request) -> str:
    """The request's ``Expect``, lowercased ("" when none, or before HTTP/1.1, where aiohttp
    heeds none either)."""
    if request.version != HttpVersion11:
        return ""
    return request.headers.get(hdrs.EXPECT, "").lower()


async def _continue_when_read(request: web.Request) -> None:
    """Every route's ``Expect`` handler does nothing: "100 Continue" is said by
    :func:`_read_body`, once a webhook passed every check that comes before its body (aiohttp's
    own handler says it before the route's handler starts, inviting an unauthenticated client,
    or one of a route that reads no body, to send it), and :func:`observed` refuses any other
    expectation, in JSON."""


def _refuse_unknown_expectation(request: web.Request) -> None:
    if _expectation(request) not in ("", "100-continue"):
        raise web.HTTPExpectationFailed()


async def _read_rest(stream: StreamReader, limit: int) -> bytes:
    buffer = bytearray()
    while chunk := await stream.readany():
        buffer += chunk
        if len(buffer) > limit:
            raise _too_large(limit)
    return bytes(buffer)


def _too_large(limit: int) -> errors.PayloadTooLarge:
    return errors.PayloadTooLarge(f"the body must not exceed {limit} bytes")


def _refuse(request: web.Request) -> errors.PayhookError:
    """A failed authentication: 401, or 429 once the source is past its failure budget."""
    if request.app[LIMITER].fail(request.remote or ""):
        return errors.RateLimited("too many failed authentications; retry later")
    return errors.Unauthorized("missing, malformed or wrong secret")


async def _accept(request: web.Request, event: InvoiceEvent) -> web.Response:
    # The request's summary line, and whatever publishing logs, name the event.
    bind_event(event.event_id)
    await request.app[PUBLISHER].publish(event)
    body = b'{"status":"accepted","event_id":"' + event.event_id.encode() + b'"}'
    return web.Response(body=body, content_type=_JSON)


async def per_order_webhook(request: web.Request) -> web.Response:
    """``POST /v1/webhooks/{provider}/{order_id}``: the providers authenticated per order."""
    name = request.match_info["provider"]
    provider = PER_ORDER.get(name)
    if provider is None:
        if name in PROVIDERS:
            raise errors.NotFound(f"{name} posts to {WEBHOOK_PREFIX}{name}")
        raise errors.UnknownProvider("no such provider")
    _require(request, "POST")
    settings = request.app[SETTINGS]
    _check_headers(request, settings.max_body_bytes)
    # The secret is in the URL or a header: checked before a byte of the body is awaited, so
    # an unauthenticated client can neither stall a handler nor have its body read.
    order_id = request.match_info["order_id"]
    presented = request.headers.get("Token") or request.query.get("token")
    if not presented or not verify_secret(settings.signing_keys, name, order_id, presented):
        raise _refuse(request)
    body = await _read_body(request, settings)
    notification = provider.decode(body)
    if provider.order_id_of(notification) != order_id:
        raise errors.OrderMismatch(
            "the order id in the body differs from the one in the URL (or is missing)"
        )
    return await _accept(request, provider.normalize(notification, datetime.now(UTC)))


async def merchant_webhook(request: web.Request) -> web.Response:
    """``POST /v1/webhooks/{provider}``: one URL per merchant, signed inside the body."""
    name = request.match_info["provider"]
    provider = MERCHANT_SIGNED.get(name)
    if provider is None:
        if name in PROVIDERS:
            raise errors.NotFound(f"{name} webhooks carry the order id in the path")
        raise errors.UnknownProvider("no such provider")
    settings = request.app[SETTINGS]
    secret = provider.merchant_secret(settings)
    if secret is None:
        raise errors.UnknownProvider(f"{provider.title} is not configured")
    _require(request, "POST")
    _check_headers(request, settings.max_body_bytes)
    body = await _read_body(request, settings)
    try:
        data = provider.authenticate(body, secret)
    except errors.InvalidJson:
        # Not JSON, so not authenticated either: it spends the source's failure budget, and
        # is still answered 400 (a body that is not JSON comes before 401/429).
        request.app[LIMITER].fail(request.remote or "")
        raise
    if data is None:
        raise _refuse(request)
    notification = provider.decode(data)
    return await _accept(request, provider.normalize(notification, datetime.now(UTC)))


async def healthz(request: web.Request) -> web.Response:
    _require(request, "GET", "HEAD")
    return _json(200, {"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    _require(request, "GET", "HEAD")
    readiness = request.app[READINESS]
    if readiness.shutting_down:
        readiness.set(False)
        return _json(503, {"status": "shutting_down"})
    # Either path makes an event durable: Kafka, or the spool while it has room for one more.
    room = request.app[SPOOL].has_room(request.app[SETTINGS].max_body_bytes)
    if not room and not await request.app[PUBLISHER].ready():
        readiness.set(False)
        return _json(503, {"status": "unavailable"})
    readiness.set(True)
    return _json(200, {"status": "ready"})


async def metrics_handler(request: web.Request) -> web.Response:
    _require(request, "GET", "HEAD")
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


# --- every route: errors, request id, metrics, one log line -----------------------------------


@final
class RequestIds:
    """One application's request ids: the client's ``X-Request-Id`` when it is sane, else a
    random per-application prefix and a counter."""

    __slots__ = ("_next", "_prefix")

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(4)
        self._next = itertools.count(1).__next__

    def of(self, request: web.Request) -> str:
        incoming = request.headers.get("X-Request-Id")
        if incoming and _REQUEST_ID.fullmatch(incoming):
            return incoming
        return f"{self._prefix}-{self._next()}"  # as new(), one call less on every request

    def new(self) -> str:
        return f"{self._prefix}-{self._next()}"


REQUEST_IDS: Final = web.AppKey("request_ids", RequestIds)


RouteHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def observed(handler: RouteHandler, ids: RequestIds, *, webhook: bool = False) -> RouteHandler:
    """The route's handler as the app registers it: maps errors to responses, times the
    request, counts a webhook by provider and outcome, and logs one line about it.

    Every route, the catch-all 404 included, is wrapped rather than passed through a
    middleware: aiohttp's middleware chain cost about 6 us per request under the benchmark.
    The log line names the path without its query string: Bitfinex's token lives there.
    """

    request_id_of = ids.of

    async def handle(request: web.Request) -> web.StreamResponse:
        request_id = request_id_of(request)
        bind_request(request_id)
        started = time.perf_counter()
        error: str | None = None
        response: web.StreamResponse
        try:
            _refuse_unknown_expectation(request)
            response = await handler(request)
        except errors.PayhookError as exc:
            error = exc.code
            response = _error_response(exc)
        except web.HTTPException as exc:  # aiohttp's own, raised from inside a handler
            error = _HTTP_CODES.get(exc.status, "bad_request" if exc.status < 500 else "internal")
            response = _json(exc.status, {"error": error, "detail": exc.reason})
        except Exception:  # a bug must answer JSON 500 and be logged, not leak a traceback
            log.exception("unhandled_error", path=request.path)
            error = "internal"
            response = _json(500, {"error": "internal", "detail": "internal error"})
        elapsed = time.perf_counter() - started
        response.headers["X-Request-Id"] = request_id

        provider: str | None = None
        if webhook:
            name = request.match_info["provider"]
            provider = name if name in PROVIDERS else "unknown"
            request.app[METRICS].webhooks.labels(provider, error or "accepted").observe(elapsed)
        access.request(
            {
                "method": request.method,
                "path": request.path,
                "status": response.status,
                "error": error,
                "provider": provider,
                "duration_ms": round(elapsed * 1000, 3),
            }
        )
        return response

    return handle


async def not_found(request: web.Request) -> web.Response:
    raise errors.NotFound("no such route")


def unparsed_answer(app: web.Application, status: int, exc: BaseException | None) -> web.Response:
    """The answer to what never reached a route: a request aiohttp could not parse (its own
    answer would echo the request line, ``?token=`` included, as plain text), or a failure
    outside every handler. Our JSON, a request id, a log line and a metric, like any other
    answer; nothing of the request is repeated."""
    request_id = app[REQUEST_IDS].new()
    bind_request(request_id)
    if status < 500:
        error, detail = "bad_request", "the request is not valid HTTP"
        # Only the parser error's name: its message quotes the raw bytes.
        log.warning("bad_http_request", error=type(exc).__name__, status=status)
    else:
        error, detail = "internal", "internal error"
        log.error("unhandled_error", exc_info=exc)
    app[METRICS].webhooks.labels("unknown", error).observe(0.0)
    access.request(
        {
            "method": None,
            "path": None,
            "status": status,
            "error": error,
            "provider": None,
            "duration_ms": 0.0,
        }
    )
    response = _json(status, {"error": error, "detail": detail})
    response.headers["X-Request-Id"] = request_id
    return response


# --- the application --------------------------------------------------------------------------


async def _spool(app: web.Application) -> AsyncIterator[None]:
    """Opened first and closed last: what a previous process left is recovered here, and a
    request that times out on Kafka during shutdown can still be spooled."""
    spool = app[SPOOL]
    await spool.start()
    yield
    await spool.close()


async def _kafka(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    for topic, problem in (await ensure_topics(settings, within=5.0)).items():
        if problem is not None:
            log.warning("topic_not_ensured", topic=topic, problem=problem)
    publisher = app[PUBLISHER]
    await publisher.start()
    yield
    await publisher.close(within=settings.publish_timeout)


async def _drainer(app: web.Application) -> AsyncIterator[None]:
    """Republishes spooled events (a previous process's included) whenever Kafka answers; at
    shutdown, once no request is in flight, goes on until the spool is empty or the shutdown
    deadline, and says what it leaves behind."""
    spool = app[SPOOL]
    task = asyncio.create_task(drain_forever(spool, app[PUBLISHER]), name="spool-drainer")
    yield
    deadline = app[SHUTDOWN].deadline
    loop = asyncio.get_running_loop()
    if deadline is None:  # cleaned up without a shutdown: a start-up that failed
        deadline = loop.time()
    if spool.holds_events and deadline > loop.time():
        log.info("spool_draining_before_exit", depth=spool.depth)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await spool.wait_empty()
    await cancel_and_wait(task)
    if spool.depth:
        # Acknowledged, fsynced, and not in Kafka: the next start on this directory drains them
        # first (the volume outlives the pod), or `payhook spool drain` does.
        log.warning(
            "spool_left_behind",
            depth=spool.depth,
            directory=str(spool.directory.resolve()),
            oldest_age_seconds=round(spool.oldest_age(), 1),
        )


async def _on_shutdown(app: web.Application) -> None:
    app[READINESS].shut_down()
    # PAYHOOK_SHUTDOWN_TIMEOUT covers the requests in flight and then the spool's drain.
    app[SHUTDOWN].deadline = asyncio.get_running_loop().time() + app[SETTINGS].shutdown_timeout


async def _mark_ready(app: web.Application) -> None:
    # The gauge must be right even where nothing polls /readyz (compose); /readyz keeps it fresh.
    app[READINESS].set(True)


def create_app(settings: Settings) -> web.Application:
    """The ingest application; connects to nothing until it starts."""
    app = web.Application(client_max_size=settings.max_body_bytes)
    metrics = IngestMetrics()
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[SPOOL] = Spool(settings.spool_dir, settings.spool_max_bytes, metrics=metrics)
    app[PUBLISHER] = Publisher(settings, metrics, app[SPOOL])
    app[LIMITER] = FailureLimiter(settings.auth_failure_budget)
    app[READINESS] = metrics.readiness
    app[SHUTDOWN] = Shutdown()
    app.cleanup_ctx.append(_spool)
    app.cleanup_ctx.append(_kafka)
    app.cleanup_ctx.append(_drainer)
    app.on_startup.append(_mark_ready)
    app.on_shutdown.append(_on_shutdown)
    # Every method reaches the handler, which answers 405 in our format itself.
    route = functools.partial(app.router.add_route, expect_handler=_continue_when_read)
    ids = app[REQUEST_IDS] = RequestIds()
    route("*", "/v1/webhooks/{provider}/{order_id}", observed(per_order_webhook, ids, webhook=True))
    route("*", "/v1/webhooks/{provider}", observed(merchant_webhook, ids, webhook=True))
    route("*", "/healthz", observed(healthz, ids))
    route("*", "/readyz", observed(readyz, ids))
    route("*", "/metrics", observed(metrics_handler, ids))
    # [\s\S], not ".": a path with an encoded line break (/%0A) is a path like any other.
    route("*", "/{path:[\\s\\S]*}", observed(not_found, ids))
    return app
