"""Start the gateway (`python -m server`) as a child process on a free loopback port, for the
benchmark when no --url is given. Only loopback: the benchmark never loads a remote host."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from clients.errors import VBoNClientError


class LaunchFailed(VBoNClientError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalServer:
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = {
            **os.environ,
            **env,
            "VBON_HOST": "127.0.0.1",
            "VBON_PORT": str(self.port),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 600.0) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server"], env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                raise LaunchFailed(
                    f"the gateway exited with code {code} while starting; last log line: "
                    f"{self.tail()} (full log: {self.log_path})"
                )
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
                health = httpx.get(self.url + "/health", timeout=2)
                if health.status_code == 503 and health.json().get("status") == "failed":
                    reason = health.json().get("reason")
                    self.stop()
                    raise LaunchFailed(f"the gateway failed to start: {reason} ({self.log_path})")
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1)
        self.stop()
        raise LaunchFailed(f"the gateway was not ready within {timeout_s:.0f} s ({self.log_path})")

    def tail(self) -> str:
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln]
        except OSError:
            return "(no log)"
        return lines[-1][-300:] if lines else "(empty log)"

    def stop(self, timeout_s: float = 60.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> LocalServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
