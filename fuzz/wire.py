"""A raw HTTP/1.1 client: sends exactly the bytes a case holds (broken ones included) and
reads every response in full, telling a clean close from a broken connection.

A connection is *broken* when it is reset, when it ends in the middle of a response, when it
ends before any response although the case expects one, or when the server stays silent past
the deadline. A response is read by its ``Content-Length`` or chunked framing, never by a
guess.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Final

_MAX_HEAD: Final = 64 * 1024


@dataclass(slots=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(slots=True)
class Exchange:
    """What one connection gave back."""

    responses: list[Response] = field(default_factory=list)
    broken: str | None = None  # why the connection is counted broken, else None
    closed_by_server: bool = False  # the server ended the connection (cleanly)


class _Broken(Exception):
    pass


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    """The status line and headers; None on a clean end before a response started."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise _Broken("connection ended inside a response head") from exc
    except asyncio.LimitOverrunError as exc:
        raise _Broken("response head too long") from exc
    return head


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            # trailers, up to the empty line
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass
            return bytes(body)
        body += await reader.readexactly(size)
        await reader.readexactly(2)


async def read_response(reader: asyncio.StreamReader, *, head_request: bool) -> Response | None:
    """One response, or None when the server closed cleanly before sending one."""
    head = await _read_head(reader)
    if head is None:
        return None
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise _Broken(f"not an HTTP status line: {lines[0][:60]!r}")
    status = int(parts[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise _Broken(f"malformed response header {line[:60]!r}")
        headers[name.strip().decode("latin-1").lower()] = value.strip().decode("latin-1")
    try:
        if head_request or status in (204, 304) or 100 <= status < 200:
            body = b""
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = await _read_chunked(reader)
        elif "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        else:  # delimited by the close
            body = await reader.read()
    except asyncio.IncompleteReadError as exc:
        raise _Broken("connection ended inside a response body") from exc
    return Response(status, headers, body)


async def exchange(
    host: str,
    port: int,
    pieces: list[bytes],
    *,
    requests: int,
    pause: float = 0.0,
    source: str | None = None,
    deadline: float = 15.0,
    expect_answer: bool = True,
    head_requests: frozenset[int] = frozenset(),
) -> Exchange:
    """Writes ``pieces`` (``pause`` seconds apart) and reads up to ``requests`` responses.

    ``expect_answer=False``: the case may legitimately be closed by the server without an
    answer (a body that never completes)."""
    result = Exchange()
    try:
        async with asyncio.timeout(deadline):
            reader, writer = await asyncio.open_connection(
                host, port, local_addr=(source, 0) if source else None, limit=_MAX_HEAD
            )
            try:
                sender = asyncio.create_task(_send(writer, pieces, pause))
                try:
                    while len(result.responses) < requests:
                        response = await read_response(
                            reader, head_request=len(result.responses) in head_requests
                        )
                        if response is None:
                            result.closed_by_server = True
                            break
                        if 100 <= response.status < 200:
                            continue  # interim (100 Continue): the answer follows
                        result.responses.append(response)
                        if response.headers.get("connection", "").lower() == "close":
                            break
                finally:
                    if not sender.done():
                        sender.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await sender
            finally:
                writer.close()
                # our own close of a connection the server may have ended already
                with contextlib.suppress(ConnectionError, OSError):
                    await writer.wait_closed()
    except TimeoutError:
        result.broken = "no answer within the deadline"
    except _Broken as exc:
        result.broken = str(exc)
    except (ConnectionResetError, BrokenPipeError) as exc:
        result.broken = type(exc).__name__
    except OSError as exc:
        result.broken = f"{type(exc).__name__}: {exc}"
    if result.broken is None and not result.responses and expect_answer:
        result.broken = "closed without an answer"
    return result


async def _send(writer: asyncio.StreamWriter, pieces: list[bytes], pause: float) -> None:
    for index, piece in enumerate(pieces):
        if index and pause:
            await asyncio.sleep(pause)  # a slow client, by design
        writer.write(piece)
        await writer.drain()
