"""``make run``: a local broker, the topics, ``payhook serve`` and ``payhook consume``.

Children run in their own sessions, so a Ctrl-C reaches them once, forwarded from here.
Without ``PAYHOOK_SIGNING_KEYS`` a development key is generated once into
``var/dev-signing-keys`` (mode 0600) and used; ``payhook secret`` needs the same value:
``export PAYHOOK_SIGNING_KEYS=$(cat var/dev-signing-keys)``.
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
from service.settings import SettingsError, load_settings

VAR: Final = Path("var")
DEV_KEYS: Final = VAR / "dev-signing-keys"
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


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


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
    for what, p in (("broker", port), ("HTTP", settings.http_port)):
        if _port_in_use(p):
            print(f"devrun: {what} port {p} is already in use", file=sys.stderr)
            return 1

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
        print(
            f"devrun: {', '.join(verbs)} on {settings.public_url} with Kafka at "
            f"{broker.bootstrap}; Ctrl-C stops",
            flush=True,
        )
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
