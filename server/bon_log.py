"""Opt-in JSONL log of BoN requests: {"prompt", "responses", "rewards"} per line, the format
the trainer reads with --reference-from, so live BoN traffic can train the next vBoN policy.

Requests only enqueue (never block); one thread writes whole lines and rotates by size. On
open, a partial last line left by a crash is cut off, so every line in the file parses."""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
_STOP = object()


def repair_tail(path: Path) -> int:
    """Cut a trailing partial line (no final newline); returns the bytes removed."""
    if not path.exists() or path.stat().st_size == 0:
        return 0
    with path.open("rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 1))
        if f.read(1) == b"\n":
            return 0
        # Walk back to the last newline.
        pos = size
        chunk = 4096
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            data = f.read(pos - start)
            idx = data.rfind(b"\n")
            if idx >= 0:
                keep = start + idx + 1
                f.truncate(keep)
                return size - keep
            pos = start
        f.truncate(0)
        return size


class BoNLog:
    def __init__(self, path: Path, max_bytes: int, backups: int, max_queue: int = 10_000) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.dropped = 0
        self.written = 0
        self._q: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        path.parent.mkdir(parents=True, exist_ok=True)
        cut = repair_tail(path)
        if cut:
            logger.warning("BoN log %s: removed a partial last line (%d bytes)", path, cut)
        self._thread = threading.Thread(target=self._run, name="bon-log", daemon=True)
        self._thread.start()

    def log(self, prompt: str, responses: list[str], rewards: list[float]) -> None:
        record = {"prompt": prompt, "responses": responses, "rewards": rewards}
        try:
            self._q.put_nowait(record)
        except queue.Full:  # the disk cannot keep up: drop rather than slow requests down
            self.dropped += 1

    def _rotate(self) -> None:
        for i in range(self.backups - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{i}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def _run(self) -> None:
        f = self.path.open("ab")
        try:
            while True:
                item = self._q.get()
                if item is _STOP:
                    break
                line = (json.dumps(item, ensure_ascii=False) + "\n").encode("utf-8")
                try:
                    if f.tell() > 0 and f.tell() + len(line) > self.max_bytes:
                        f.close()
                        self._rotate()
                        f = self.path.open("ab")
                    f.write(line)  # one whole line per write, then flush to the OS
                    f.flush()
                    self.written += 1
                except OSError:
                    logger.exception("BoN log write failed; record dropped")
                    self.dropped += 1
        finally:
            f.close()

    def close(self, timeout: float = 10.0) -> None:
        self._q.put(_STOP)
        self._thread.join(timeout)
