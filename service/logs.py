"""structlog configuration, in one function.

One line per event, JSON by default (console for humans). Request-scoped values (the request
id, then the event id) live in one context variable, set for each request by the app
(:func:`bind_request`) and merged into every line logged while it is handled; aiohttp runs each
request in its own task, so nothing carries over to the next. Lines from the standard library
loggers (aiohttp, aiokafka) go through the same renderer.

Never log a secret, a token, a query string or customer data: callers pass only ids, codes and
timings.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
import time
from contextvars import ContextVar
from typing import Any, BinaryIO, Final, final

import orjson
import structlog
from aiohttp.http_exceptions import HttpProcessingError
from structlog.typing import EventDict, WrappedLogger

_REQUEST_FIELDS: Final[ContextVar[dict[str, str] | None]] = ContextVar(
    "payhook_request_fields", default=None
)


def bind_request(request_id: str) -> None:
    """Starts the log context of the request handled by the current task."""
    _REQUEST_FIELDS.set({"request_id": request_id})


def bind_event(event_id: str) -> None:
    """Names the event in the rest of the current request's lines."""
    fields = _REQUEST_FIELDS.get()
    if fields is not None:
        fields["event_id"] = event_id


def merge_request_fields(logger: WrappedLogger, name: str, event: EventDict) -> EventDict:
    """The processor that adds the current request's fields (one lookup: structlog's own
    ``merge_contextvars`` walks every context variable of the task, on every line)."""
    fields = _REQUEST_FIELDS.get()
    if fields:
        for key, value in fields.items():
            event.setdefault(key, value)
    return event


class RequestLogger(structlog.BoundLoggerBase):
    """A structlog wrapper class (structlog's "custom wrappers") for the one line per request:
    the line's fields, already one dict that nothing else holds, go through the configured
    processors as they are. The generic bound logger copies its keyword arguments three times
    and its context once on the way: 8 against 5 us a line in the serving process, on every
    request. Nothing is bound to this logger, so there is no context to merge."""

    def request(self, fields: dict[str, Any]) -> None:
        """Logs ``fields`` as the ``request`` event, at info level."""
        fields["event"] = "request"
        logger = self._logger
        line: Any = fields
        try:
            for processor in self._processors:
                line = processor(logger, "info", line)
        except structlog.DropEvent:
            return
        if isinstance(line, dict):  # a chain without a renderer (structlog allows it)
            logger.info(**line)
        else:
            logger.info(line)


def request_logger(name: str) -> RequestLogger:
    """A :class:`RequestLogger` that follows the configuration, as ``structlog.get_logger``
    does."""
    logger: RequestLogger = structlog.wrap_logger(
        None, wrapper_class=RequestLogger, logger_factory_args=(name,)
    )
    return logger


@final
class LineWriter:
    """A structlog logger that writes the lines rendered during one event-loop turn with one
    system call, at the start of the next turn (outside a loop: at once).

    One summary line per request is on the hot path, and a write per line cost as much as
    answering the request. A line waits at most one loop turn; at exit, the writer
    :func:`configure_logging` installed writes what is left.
    """

    __slots__ = ("_file", "_lines", "_scheduled")

    @property
    def file(self) -> BinaryIO:
        return self._file

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._lines: list[bytes] = []
        self._scheduled = False

    def msg(self, message: bytes) -> None:
        self._lines.append(message + b"\n")
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._scheduled = True
        loop.call_soon(self.flush)

    log = debug = info = warn = warning = error = err = critical = exception = fatal = msg

    def flush(self) -> None:
        self._scheduled = False
        if not self._lines:
            return
        data = b"".join(self._lines)
        self._lines.clear()
        self._file.write(data)
        self._file.flush()


def drop_request_bytes(logger: WrappedLogger, name: str, event: EventDict) -> EventDict:
    """aiohttp logs a request it cannot parse (a line or header too long, a malformed header)
    with the parser's exception, whose message quotes the raw bytes: the URL's ``token``, a
    ``Token`` header. Only which error it was is kept; a client's garbage is a warning."""
    exc_info = event.get("exc_info")
    error = exc_info[1] if isinstance(exc_info, tuple) else None
    if isinstance(error, HttpProcessingError):
        del event["exc_info"]
        event["event"] = "bad_http_request"
        event["error"] = type(error).__name__
        event["status"] = error.code
        event["level"] = "warning"
    return event


@final
class UtcTimestamp:
    """``timestamp`` as structlog's ``TimeStamper(fmt="iso", utc=True)`` writes it
    (``2024-09-05T21:00:27.123456Z``), with the date and time formatted once per second:
    it is on every request's line."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, logger: object, name: str, event: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        event["timestamp"] = f"{self._prefix}.{int((now - second) * 1e6):06d}Z"
        return event


@final
class _Installed:
    """The one LineWriter configured for this process: flushed at exit by the one ``atexit``
    handler, however often logging is configured."""

    writer: LineWriter | None = None

    @classmethod
    def flush(cls) -> None:
        if cls.writer is not None:
            cls.writer.flush()


def _exit_flushed_writer(file: BinaryIO) -> LineWriter:
    """The writer for ``file``: the installed one when it writes there already, else a new one
    that replaces it (what the old one held is written first)."""
    installed = _Installed.writer
    if installed is not None and installed.file is file:
        return installed
    if installed is None:
        atexit.register(_Installed.flush)
    else:
        installed.flush()
    _Installed.writer = LineWriter(file)
    return _Installed.writer


def configure_logging(
    log_format: str = "json", level: int = logging.INFO, *, cache: bool = True
) -> None:
    """Configures structlog and the root logger for this process (idempotent).

    ``cache=False`` keeps loggers reconfigurable (tests that switch configurations)."""
    shared: list[Any] = [
        merge_request_fields,
        structlog.processors.add_log_level,
        UtcTimestamp(),
    ]
    renderer: Any
    factory: Any
    if log_format == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
        factory = structlog.WriteLoggerFactory(file=sys.stderr)
        foreign_renderer = renderer
    else:
        # orjson renders bytes: one line per request is on the hot path.
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        writer = _exit_flushed_writer(sys.stderr.buffer)
        factory = lambda *args: writer  # noqa: E731 - structlog calls it with the logger name
        foreign_renderer = structlog.processors.JSONRenderer()

    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=cache,
    )

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                *shared,
                structlog.stdlib.add_logger_name,
                drop_request_bytes,
                structlog.processors.format_exc_info,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                foreign_renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Library chatter (aiokafka reconnects every second while the broker is down) only from
    # warnings up; aiohttp's own access log is off (it would print the token query string).
    root.setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").disabled = True
