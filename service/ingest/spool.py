"""The local spool: events Kafka has not acknowledged in time wait here, on disk, until it does.

Storage: append-only segment files of framed records (magic, length, CRC-32), not SQLite.

- The spool is a queue: appended at one end, read and acknowledged at the other. A segment file
  does exactly that with one ``write`` and one ``fdatasync`` per append; a whole segment is
  deleted once it is acknowledged, so space comes back without SQLite's page reuse, checkpoints
  or ``VACUUM``, and the bytes on disk are the bytes we count against ``spool_max_bytes``.
- Group commit: appends that arrive while a flush is running are written together and share the
  next ``fdatasync``, so a burst of requests during an outage costs a few disk flushes, not one
  each. Writes, flushes, reads and recovery run in a worker thread, never on the event loop.
- Crash safety is ours to see and to test: appends are sequential, so a crash can only tear the
  tail of the newest segment. Each frame carries a magic, its length and a CRC-32 over both
  length and payload; at start-up the first frame that is short, has a bad magic (a zero-filled
  tail after power loss) or a bad checksum ends the segment: it is logged, truncated away and
  start-up goes on. A torn frame was never fsynced, so it was never acknowledged to a client.
- Acknowledging drained records moves a cursor (segment, offset) kept in a small checksummed
  file. It is written after Kafka acknowledged the batch, so a crash in between republishes that
  batch: delivery is at least once and the consumer absorbs the duplicate by ``event_id``.
- One process at a time: the spool holds an exclusive ``flock`` on ``DIR/lock`` while open, so
  ``payhook spool drain`` refuses a directory a live ``serve`` holds, and a killed ``serve``
  leaves no lock behind (the kernel drops it with the process). :func:`inspect` reads a spool
  without the lock and without changing a byte (``payhook spool status``, beside ``serve``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import struct
import time
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final, NamedTuple, Protocol, final

import msgspec
import structlog

from service.errors import Unavailable
from service.ingest.metrics import IngestMetrics

log = structlog.get_logger(__name__)

_MAGIC: Final = b"PHS1"
# magic, payload length, CRC-32 of (length bytes + payload)
_HEADER: Final = struct.Struct(">4sII")
_LENGTH: Final = struct.Struct(">I")
_CURSOR: Final = struct.Struct(">4sQQI")
_CURSOR_MAGIC: Final = b"PHC1"
_CURSOR_FILE: Final = "cursor"
_LOCK_FILE: Final = "lock"
_LOCK_ATTEMPTS: Final = 10
_LOCK_RETRY_SECONDS: Final = 0.02
_SEGMENT_SUFFIX: Final = ".seg"
# A frame longer than this is garbage, not a record (a webhook body is at most a few MiB).
_MAX_FRAME: Final = 64 * 1024 * 1024


class SpoolError(Unavailable):
    """The spool cannot make the event durable (closed, or the disk refused the write)."""


class SpoolFull(SpoolError):
    """The spool holds ``spool_max_bytes`` already."""


class SpoolLocked(SpoolError):
    """Another live process (a ``payhook serve``, a drain) has the spool open."""


class SpooledEvent(msgspec.Struct, frozen=True, array_like=True):
    """One Kafka record waiting for the broker: exactly what the producer would have sent."""

    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    spooled_at: float  # wall-clock seconds, so the age survives a restart


class _Entry(NamedTuple):
    seq: int
    offset: int
    size: int  # whole frame
    spooled_at: float


_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(SpooledEvent)


def encode_frame(event: SpooledEvent) -> bytes:
    payload = _encoder.encode(event)
    length = _LENGTH.pack(len(payload))
    crc = zlib.crc32(payload, zlib.crc32(length))
    return _HEADER.pack(_MAGIC, len(payload), crc) + payload


def _segment_name(seq: int) -> str:
    return f"{seq:016d}{_SEGMENT_SUFFIX}"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@final
class Spool:
    """An on-disk FIFO of :class:`SpooledEvent`, durable before :meth:`append` returns.

    Use as ``async with Spool(...) as spool`` (or :meth:`start` / :meth:`close`). Only one
    process may use a directory at a time; one reader (the drainer) reads and acknowledges.
    """

    def __init__(
        self,
        directory: Path,
        max_bytes: int,
        *,
        segment_bytes: int | None = None,
        metrics: IngestMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes or max(4096, min(8 * 1024 * 1024, max_bytes // 8))
        self._metrics = metrics
        self._clock = clock
        self._entries: deque[_Entry] = deque()
        self._segments: dict[int, int] = {}  # seq -> size on disk
        self._disk_bytes = 0
        self._next_seq = 1
        self._active_seq: int | None = None
        self._active_fd: int | None = None
        self._pending: list[tuple[bytes, float, asyncio.Future[None]]] = []
        self._pending_bytes = 0
        self._writing = 0  # records in the batch being written now
        self._wakeup = asyncio.Event()
        self._nonempty = asyncio.Event()
        self._empty = asyncio.Event()
        self._empty.set()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._broken: str | None = None
        self._lock_fd: int | None = None
        self.flushes = 0  # fdatasync calls: fewer than appends when group commit works

    # -- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Takes the spool's lock, recovers what a previous process left (in a thread) and
        starts the writer. Raises :class:`SpoolLocked` when another process holds it."""
        await asyncio.to_thread(self._lock)
        try:
            await asyncio.to_thread(self._recover)
        except BaseException:
            self._unlock()
            raise
        self._update_state()
        if self._metrics is not None:
            self._metrics.spool_oldest_age.set_function(self.oldest_age)
            if self._entries:
                self._metrics.spool_recovered.set(len(self._entries))
                self._metrics.spool_recovered_at.set(self._clock())
        self._writer = asyncio.create_task(self._write_loop(), name="spool-writer")

    async def close(self) -> None:
        """Writes what is pending, then stops the writer and closes the active segment."""
        self._closing = True
        self._wakeup.set()
        if self._writer is not None:
            await self._writer
            self._writer = None
        if self._active_fd is not None:
            os.close(self._active_fd)
            self._active_fd = None
        self._unlock()

    def _lock(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        # `payhook spool status` holds a shared lock for an instant to see whether anyone
        # holds this one: a few short retries let that pass, a live owner does not.
        for attempt in range(_LOCK_ATTEMPTS):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if attempt + 1 < _LOCK_ATTEMPTS:
                    time.sleep(_LOCK_RETRY_SECONDS)
                continue
            self._lock_fd = fd
            return
        os.close(fd)
        raise SpoolLocked(f"the spool {self.directory} is in use by another process")

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # releases the flock

    async def __aenter__(self) -> Spool:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- state ------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Durable records not yet acknowledged."""
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        """Bytes on disk (acknowledged records linger until their segment is deleted)."""
        return self._disk_bytes

    @property
    def holds_events(self) -> bool:
        """True while anything is spooled or being spooled: new events must queue behind it."""
        return bool(self._entries or self._pending or self._writing)

    def has_room(self, size: int = 1) -> bool:
        return (
            self._broken is None
            and not self._closing
            and self._disk_bytes + self._pending_bytes + size <= self.max_bytes
        )

    def oldest_age(self) -> float:
        if not self._entries:
            return 0.0
        return max(0.0, self._clock() - self._entries[0].spooled_at)

    async def wait_nonempty(self) -> None:
        await self._nonempty.wait()

    async def wait_empty(self) -> None:
        """Returns once every spooled record has been acknowledged."""
        await self._empty.wait()

    # -- append (group commit) --------------------------------------------------------------

    async def append(self, event: SpooledEvent) -> None:
        """Returns once ``event`` is fsynced. Raises :class:`SpoolFull` or :class:`SpoolError`."""
        frame = encode_frame(event)
        if self._closing or self._writer is None:
            raise SpoolError("the spool is closed", retry_after=1)
        if self._broken is not None:
            raise SpoolError(f"the spool is unwritable: {self._broken}")
        if not self.has_room(len(frame)):
            raise SpoolFull("the spool is full", retry_after=30)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((frame, event.spooled_at, future))
        self._pending_bytes += len(frame)
        self._update_state()
        self._wakeup.set()
        # A caller that goes away does not take the write with it.
        await asyncio.shield(future)

    async def _write_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch, self._pending = self._pending, []
                self._writing = len(batch)
                try:
                    await self._write_batch(batch)
                finally:
                    # Counted against the bound until written (or refused).
                    self._pending_bytes -= sum(len(frame) for frame, _, _ in batch)
                    self._writing = 0
                    self._update_state()
            if self._closing:
                return

    async def _write_batch(self, batch: list[tuple[bytes, float, asyncio.Future[None]]]) -> None:
        data = b"".join(frame for frame, _, _ in batch)
        try:
            seq, start = await self._prepare_segment()
            await asyncio.to_thread(self._append_sync, self._active_fd, data, start)
        except OSError as exc:
            log.error("spool_write_failed", error=str(exc), records=len(batch))
            error = SpoolError(f"the spool could not write: {exc.strerror or exc}")
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(error)
                # Nobody may be awaiting a shielded future whose caller went away.
                future.exception()
            return
        self._segments[seq] = start + len(data)
        self._disk_bytes += len(data)
        offset = start
        for frame, spooled_at, future in batch:
            self._entries.append(_Entry(seq, offset, len(frame), spooled_at))
            offset += len(frame)
            if not future.done():
                future.set_result(None)

    async def _prepare_segment(self) -> tuple[int, int]:
        """The active segment and its size, opening a new one when it is full or fully acked.

        State changes happen here on the event loop; the thread only touches files.
        """
        active = self._active_seq
        retire: int | None = None
        if active is not None:
            size = self._segments[active]
            if size > 0 and (not self._entries or self._entries[-1].seq != active):
                retire = active  # fully acknowledged: start afresh and give the space back
            elif size < self.segment_bytes:
                return active, size
        seq = self._next_seq
        self._next_seq += 1
        old_fd, self._active_fd, self._active_seq = self._active_fd, None, None
        fd = await asyncio.to_thread(self._open_segment_sync, seq, old_fd, retire)
        self._active_seq, self._active_fd = seq, fd
        self._segments[seq] = 0
        if retire is not None:
            self._forget_segment(retire)
        return seq, 0

    def _open_segment_sync(self, seq: int, old_fd: int | None, retire: int | None) -> int:
        if old_fd is not None:
            os.close(old_fd)
        fd = os.open(
            self.directory / _segment_name(seq),
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND,
            0o600,
        )
        # The new file's name must survive a power loss along with its content.
        _fsync_dir(self.directory)
        if retire is not None:
            self._unlink_segment(retire)
        return fd

    def _append_sync(self, fd: int | None, data: bytes, start: int) -> None:
        """Runs in a thread: appends ``data`` to the active segment and fdatasyncs it."""
        assert fd is not None
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fdatasync(fd)
            self.flushes += 1
        except OSError:
            # Never leave a half-written frame in front of the next append.
            try:
                os.ftruncate(fd, start)
            except OSError as exc:
                self._broken = str(exc)
            raise

    def _unlink_segment(self, seq: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.directory / _segment_name(seq))

    def _forget_segment(self, seq: int) -> None:
        size = self._segments.pop(seq, None)
        if size is not None:
            self._disk_bytes -= size

    # -- read and acknowledge ---------------------------------------------------------------

    async def read(self, limit: int) -> list[SpooledEvent]:
        """The oldest ``limit`` unacknowledged events, oldest first."""
        entries = [self._entries[i] for i in range(min(limit, len(self._entries)))]
        if not entries:
            return []
        return await asyncio.to_thread(self._read, entries)

    def _read(self, entries: list[_Entry]) -> list[SpooledEvent]:
        events: list[SpooledEvent] = []
        fds: dict[int, int] = {}
        try:
            for entry in entries:
                fd = fds.get(entry.seq)
                if fd is None:
                    fd = fds[entry.seq] = os.open(
                        self.directory / _segment_name(entry.seq), os.O_RDONLY
                    )
                frame = os.pread(fd, entry.size, entry.offset)
                events.append(_decoder.decode(frame[_HEADER.size :]))
        finally:
            for fd in fds.values():
                os.close(fd)
        return events

    async def ack(self, count: int) -> None:
        """Acknowledges the oldest ``count`` records (they reached Kafka)."""
        count = min(count, len(self._entries))
        if count <= 0:
            return
        last = self._entries[count - 1]
        for _ in range(count):
            self._entries.popleft()
        # Drained: every segment up to the last acknowledged one goes (a recovered segment too;
        # the active one, still written to, only as below).
        first_live = self._entries[0].seq if self._entries else last.seq + 1
        retire = [s for s in self._segments if s < first_live and s != self._active_seq]
        close_fd: int | None = None
        if not self.holds_events and self._active_seq is not None:
            # Drained and the writer idle: give the active segment's space back now, or a full
            # spool would stay full until the next append, which it refuses.
            retire.append(self._active_seq)
            close_fd, self._active_fd, self._active_seq = self._active_fd, None, None
        for seq in retire:
            self._forget_segment(seq)
        self._update_state()
        if self._metrics is not None:
            self._metrics.spool_drained.inc(count)
        await asyncio.to_thread(
            self._persist_ack, last.seq, last.offset + last.size, retire, close_fd
        )

    def _persist_ack(self, seq: int, offset: int, retire: list[int], close_fd: int | None) -> None:
        if close_fd is not None:
            os.close(close_fd)
        body = _CURSOR_MAGIC + struct.pack(">QQ", seq, offset)
        data = _CURSOR.pack(_CURSOR_MAGIC, seq, offset, zlib.crc32(body))
        tmp = self.directory / (_CURSOR_FILE + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.directory / _CURSOR_FILE)
        for seq in retire:
            self._unlink_segment(seq)

    # -- recovery ---------------------------------------------------------------------------

    def _read_cursor(self) -> tuple[int, int]:
        path = self.directory / _CURSOR_FILE
        cursor = _peek_cursor(path)
        if cursor is None:
            # Starting from the beginning republishes acknowledged records: duplicates, not loss.
            log.warning("spool_cursor_invalid", path=str(path))
            return 0, 0
        return cursor

    def _recover(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.directory / (_CURSOR_FILE + ".tmp"))
        cursor_seq, cursor_offset = self._read_cursor()
        seqs: list[int] = []
        for path in self.directory.glob("*" + _SEGMENT_SUFFIX):
            try:
                seqs.append(int(path.stem))
            except ValueError:
                log.warning("spool_stray_file", path=str(path))
        seqs.sort()
        for seq in seqs:
            self._next_seq = max(self._next_seq, seq + 1)
            path = self.directory / _segment_name(seq)
            if seq < cursor_seq:
                os.unlink(path)
                continue
            skip_before = cursor_offset if seq == cursor_seq else 0
            entries, size = self._scan(path, seq, skip_before)
            if not entries:
                os.unlink(path)
                continue
            self._entries.extend(entries)
            self._segments[seq] = size
            self._disk_bytes += size
        if self._entries:
            log.info("spool_recovered", depth=len(self._entries), bytes=self._disk_bytes)

    def _scan(self, path: Path, seq: int, skip_before: int) -> tuple[list[_Entry], int]:
        """Valid frames of one segment; a torn or corrupt tail is truncated away."""
        data = path.read_bytes()
        entries, offset, reason = _frames(data, seq, skip_before)
        if reason:
            log.warning(
                "spool_torn_record",
                segment=path.name,
                offset=offset,
                discarded_bytes=len(data) - offset,
                reason=reason,
            )
            with open(path, "r+b") as file:
                file.truncate(offset)
                os.fsync(file.fileno())
        return entries, offset

    # -- bookkeeping ------------------------------------------------------------------------

    def _update_state(self) -> None:
        if self._entries:
            self._nonempty.set()
        else:
            self._nonempty.clear()
        if self.holds_events:
            self._empty.clear()
        else:
            self._empty.set()
        if self._metrics is not None:
            self._metrics.spool_depth.set(len(self._entries))
            self._metrics.spool_bytes.set(self._disk_bytes)


def _frames(data: bytes, seq: int, skip_before: int) -> tuple[list[_Entry], int, str]:
    """The valid frames of a segment's bytes at or after ``skip_before``, where the valid part
    ends, and why it ends there ("" at the end of ``data``)."""
    entries: list[_Entry] = []
    offset = 0
    reason = ""
    while offset < len(data):
        if len(data) - offset < _HEADER.size:
            reason = "short header"
            break
        magic, length, crc = _HEADER.unpack_from(data, offset)
        if magic != _MAGIC or length > _MAX_FRAME:
            reason = "bad magic or length"
            break
        end = offset + _HEADER.size + length
        if end > len(data):
            reason = "short payload"
            break
        payload = data[offset + _HEADER.size : end]
        if zlib.crc32(payload, zlib.crc32(_LENGTH.pack(length))) != crc:
            reason = "checksum mismatch"
            break
        try:
            event = _decoder.decode(payload)
        except msgspec.DecodeError:
            reason = "undecodable record"
            break
        if offset >= skip_before:
            entries.append(_Entry(seq, offset, end - offset, event.spooled_at))
        offset = end
    return entries, offset, reason


@final
class SpoolStatus(msgspec.Struct, frozen=True, kw_only=True):
    """What ``payhook spool status`` reports of a spool directory."""

    directory: str
    depth: int  # records not yet acknowledged by Kafka
    bytes: int  # segment bytes on disk
    oldest_age_seconds: float  # of the oldest record not yet acknowledged; 0 when empty
    locked: bool  # a live process (serve, a drain) holds it


def inspect(directory: Path, now: float | None = None) -> SpoolStatus:
    """Reads a spool without its lock and without writing: safe beside a running ``serve``.
    A frame being written just now reads as a torn tail and is not counted. Raises OSError
    when the directory cannot be read."""
    # As Spool reads it: an invalid cursor replays everything.
    cursor_seq, cursor_offset = _peek_cursor(directory / _CURSOR_FILE) or (0, 0)
    depth = size = 0
    oldest: float | None = None
    for path in sorted(directory.iterdir()):
        if path.suffix != _SEGMENT_SUFFIX or not path.stem.isdigit():
            continue
        seq = int(path.stem)
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # retired by serve meanwhile
            continue
        size += len(data)
        if seq < cursor_seq:
            continue
        entries, _, _ = _frames(data, seq, cursor_offset if seq == cursor_seq else 0)
        depth += len(entries)
        if entries and oldest is None:
            oldest = entries[0].spooled_at
    age = 0.0 if oldest is None else max(0.0, (time.time() if now is None else now) - oldest)
    return SpoolStatus(
        directory=str(directory),
        depth=depth,
        bytes=size,
        oldest_age_seconds=round(age, 3),
        locked=_is_locked(directory / _LOCK_FILE),
    )


def _peek_cursor(path: Path) -> tuple[int, int] | None:
    """The cursor's (segment, offset): (0, 0) before the first acknowledgement, None when the
    file is invalid."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0, 0
    if len(data) == _CURSOR.size:
        magic, seq, offset, crc = _CURSOR.unpack(data)
        if magic == _CURSOR_MAGIC and crc == zlib.crc32(data[: _CURSOR.size - 4]):
            return seq, offset
    return None


def _is_locked(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # a shared lock taken here goes with the descriptor
    return False


class SpoolSink(Protocol):
    """Where the drainer republishes spooled events: Kafka, with ``acks=all``."""

    async def publish_spooled(self, events: Sequence[SpooledEvent]) -> None:
        """Returns once every event is acknowledged, in order; raises when they were not."""


async def drain_forever(
    spool: Spool,
    sink: SpoolSink,
    *,
    batch_size: int = 500,
    min_backoff: float = 0.05,
    max_backoff: float = 2.0,
) -> None:
    """Republishes spooled events oldest first while the sink accepts them. Runs until cancelled.

    A batch is acknowledged only after the sink returned, so a failure or a cancellation in
    between republishes it (at least once; ``event_id`` makes the repeat harmless).
    """
    backoff = min_backoff
    while True:
        await spool.wait_nonempty()
        events = await spool.read(batch_size)
        if not events:
            continue
        try:
            await sink.publish_spooled(events)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of the broker means: retry later
            log.warning(
                "spool_drain_failed",
                error=type(exc).__name__,
                detail=str(exc)[:200],
                depth=spool.depth,
                retry_in=round(backoff, 3),
            )
            # A retry pause, not synchronization: the broker is down or slow.
            await asyncio.sleep(backoff)
            backoff = min(max_backoff, backoff * 2)
            continue
        backoff = min_backoff
        await spool.ack(len(events))
        log.info("spool_drained", events=len(events), depth=spool.depth)
