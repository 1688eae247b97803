"""Container health check: exits 0 when this container's payhook answers GET /healthz.

One image runs `payhook serve` (PAYHOOK_HTTP_PORT), `payhook consume` (PAYHOOK_CONSUMER_PORT)
or `payhook recover` (PAYHOOK_RECOVER_PORT), and only that one process listens in the
container, so the check asks each port and is healthy when one answers 200. Standard library
only.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def healthy(port: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def main() -> int:
    ports = (
        os.environ.get("PAYHOOK_HTTP_PORT", "8080"),
        os.environ.get("PAYHOOK_CONSUMER_PORT", "8081"),
        os.environ.get("PAYHOOK_RECOVER_PORT", "8082"),
    )
    return 0 if any(healthy(port) for port in ports) else 1


if __name__ == "__main__":
    sys.exit(main())
