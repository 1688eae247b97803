"""``make run``: a local broker, the topics, ``payhook serve`` and ``payhook consume``.

Children run in their own sessions, so a Ctrl-C reaches them once, forwarded from here.
Without ``PAYHOOK_SIGNING_KEYS`` a development key is generated once into
``var/dev-signing-keys`` (mode 0600) and used; ``payhook secret`` needs the same value:
``export PAYHOOK_SIGNING_KEYS=$(cat var/dev-signing-keys)``.

Every port it needs is checked before anything starts, and a busy one is named with the
setting that moves it. The local broker keeps everything in memory, so a run starts with a
fresh local store too (``var/dev/payhook.db``, removed at start): an old store beside an empty
broker would have seen every re-posted example already and settle nothing.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Final

from devtools.devbroker import LocalBroker
from service.kafka import ensure_topics
from service.settings import Settings, SettingsError, load_settings, local_url

VAR: Final = Path("var")
DEV_KEYS: Final = VAR / "dev-signing-keys"
DEV_STORE: Final = VAR / "dev" / "payhook.db"
_POLL_SECONDS: Final = 0.2


def dev_signing_keys(path: Path = DEV_KEYS) -> str:
    """The development key, created on first use, readable by the owner only."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        value = "dev:" + base64.b64encode(os.urandom(32)).decode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(value + "\n")
    return path.read_text().strip()


def _port_in_use(host: str, port: int) -> bool:
    """Whether a server could not listen on ``host:port`` now (bound as servers bind it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def busy_ports(settings: Settings) -> list[str]:
    """A line for every port ``make run`` needs that is taken, naming the setting that moves
    it; empty when all are free."""
    host, _, port_text = settings.kafka_bootstrap.rpartition(":")
    needed = (
        ("the local broker", host, int(port_text), "PAYHOOK_KAFKA_BOOTSTRAP=127.0.0.1:PORT"),
        ("payhook serve", settings.http_host, settings.http_port, "PAYHOOK_HTTP_PORT"),
        ("payhook consume", settings.http_host, settings.consumer_port, "PAYHOOK_CONSUMER_PORT"),
    )
    return [
        f"port {port} ({what}) is already in use on {host}; move it with {setting}"
        for what, host, port, setting in needed
        if _port_in_use(host, port)
    ]


def fresh_dev_store(env: dict[str, str], path: Path = DEV_STORE) -> str:
    """The store URL for this run: unless ``PAYHOOK_STORE_URL`` is set, a local SQLite store
    emptied now, because the local broker starts empty too. A line says which."""
    if env.get("PAYHOOK_STORE_URL"):
        return (
            "devrun: PAYHOOK_STORE_URL is set: that store keeps what earlier runs stored, "
            "while the local broker starts empty"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        leftover.unlink(missing_ok=True)
    env["PAYHOOK_STORE_URL"] = f"sqlite:///{path}"
    return f"devrun: fresh local store {path} (the local broker keeps nothing between runs)"


def summary(settings: Settings, bootstrap: str) -> str:
    """The line that says where everything listens, from the settings actually in force."""
    return (
        f"devrun: payhook serve on {local_url(settings.http_host, settings.http_port)} "
        f"(webhook URLs start {settings.public_url}), payhook consume probes on "
        f"{local_url(settings.http_host, settings.consumer_port)}, Kafka at "
        f"{bootstrap}; Ctrl-C stops"
    )


def main() -> int:
    env = dict(os.environ)
    if not env.get("PAYHOOK_SIGNING_KEYS"):
        env["PAYHOOK_SIGNING_KEYS"] = dev_signing_keys()
        print(f"devrun: using the development signing key in {DEV_KEYS}", flush=True)
    env.setdefault("PAYHOOK_LOG_FORMAT", "console")
    try:
        settings = load_settings(env)
    except SettingsError as exc:
        print(f"devrun: {exc}", file=sys.stderr)
        return 2
    host, _, port_text = settings.kafka_bootstrap.rpartition(":")
    if host not in ("127.0.0.1", "localhost") or not port_text.isdigit():
        print("devrun: PAYHOOK_KAFKA_BOOTSTRAP must be 127.0.0.1:PORT", file=sys.stderr)
        return 2
    port = int(port_text)
    busy = busy_ports(settings)
    if busy:
        for line in busy:
            print(f"devrun: {line}", file=sys.stderr)
        return 1
    print(fresh_dev_store(env), flush=True)

    stop_signal: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop_signal.append(signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    VAR.mkdir(exist_ok=True)
    broker = LocalBroker(port, log_path=VAR / "tansu.log")
    broker.start()
    children: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for topic, problem in asyncio.run(ensure_topics(settings)).items():
            print(f"devrun: topic {topic}: {problem or 'ok'}", flush=True)
        verbs = ["serve", "consume"]
        for verb in verbs:
            children[verb] = subprocess.Popen(
                [sys.executable, "-m", "service.cli", verb], env=env, start_new_session=True
            )
        print(summary(settings, broker.bootstrap), flush=True)
        while not stop_signal and broker.running:
            exited = [verb for verb, proc in children.items() if proc.poll() is not None]
            if exited:
                print(f"devrun: {', '.join(exited)} exited; stopping", file=sys.stderr)
                break
            time.sleep(_POLL_SECONDS)
    finally:
        _stop(children, settings.shutdown_timeout + 5)
        broker.stop()
    failed = [verb for verb, proc in children.items() if proc.returncode not in (0, None)]
    return 1 if failed and not stop_signal else 0


def _stop(children: dict[str, subprocess.Popen[bytes]], grace: float) -> None:
    for proc in children.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in children.values():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    sys.exit(main())
