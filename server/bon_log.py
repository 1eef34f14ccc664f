"""Opt-in JSONL log of BoN requests: {"prompt", "responses", "rewards"} per line, the format
the trainer reads with --reference-from, so live BoN traffic can train the next vBoN policy.

Requests only enqueue (never block); one thread writes whole lines and rotates by size. On
open, a partial last line left by a crash is cut off, so every line in the file parses.

The log holds raw prompts and completions: its files are created owner-only (0600), and an
optional redaction hook (VBON_BON_LOG_REDACT, see load_redactor) rewrites or skips each record
before it is written. The writer thread outlives any failure (disk full, a failed rotation, a
redactor that raises): the record is counted as dropped and the next one is tried again."""

from __future__ import annotations

import importlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from server.metrics import Metrics

logger = logging.getLogger(__name__)
_STOP = object()
FILE_MODE = 0o600  # prompts are user data: readable by the gateway's user only

Record = dict[str, Any]
Redactor = Callable[[Record], Record | None]


def load_redactor(spec: str | None) -> Redactor | None:
    """The redaction hook named by VBON_BON_LOG_REDACT, 'package.module:function' (the function
    may be an attribute path, 'module:Class.method'). Loaded once at start so that a typo fails
    start-up with this message rather than silently logging unredacted prompts."""
    if not spec:
        return None
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"VBON_BON_LOG_REDACT={spec!r}: expected 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module itself raising while it loads
        raise ValueError(
            f"VBON_BON_LOG_REDACT={spec!r}: cannot import {module_name!r}: {exc}"
        ) from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ValueError(
                f"VBON_BON_LOG_REDACT={spec!r}: {module_name!r} has no attribute {attr!r}"
            ) from exc
    if not callable(obj):
        raise ValueError(f"VBON_BON_LOG_REDACT={spec!r}: {attr!r} is not callable")
    redactor: Redactor = obj
    return redactor


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
    # After a failed rotation keep appending to the current file and try again this much later,
    # rather than renaming (and logging) on every record while the disk is full.
    rotate_retry_s: float = 60.0

    def __init__(
        self,
        path: Path,
        max_bytes: int,
        backups: int,
        max_queue: int = 10_000,
        metrics: Metrics | None = None,
        redact: Redactor | None = None,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.dropped = 0
        self.written = 0
        self.skipped = 0  # records the redactor chose not to log (not a failure)
        self._metrics = metrics
        if metrics is not None:
            for reason in ("queue_full", "error"):  # exported as 0 from the start, for alerts
                metrics.bon_log_dropped.labels(reason)
        self._redact = redact
        # log() runs on request threads and the writer counts too: += on an int is not atomic.
        self._count_lock = threading.Lock()
        self._failing: set[str] = set()  # what is failing now, so each failure is logged once
        self._rotate_after = 0.0
        self._fd: int | None = None
        self._size = 0
        self._q: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Opened here, not in the thread, so an unwritable path fails start-up.
        self._open()
        self._thread = threading.Thread(target=self._run, name="bon-log", daemon=True)
        self._thread.start()

    def log(self, prompt: str, responses: list[str], rewards: list[float]) -> None:
        record = {"prompt": prompt, "responses": responses, "rewards": rewards}
        try:
            self._q.put_nowait(record)
        except queue.Full:  # the disk cannot keep up: drop rather than slow requests down
            self._drop("queue_full")

    def _drop(self, reason: str) -> None:
        with self._count_lock:
            self.dropped += 1
        if self._metrics is not None:
            self._metrics.bon_log_dropped.labels(reason).inc()

    # -- writer thread -------------------------------------------------------------------------
    def _open(self) -> None:
        cut = repair_tail(self.path)  # a failed write may have left a partial line
        if cut:
            logger.warning("BoN log %s: removed a partial last line (%d bytes)", self.path, cut)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
        try:
            # O_CREAT's mode is masked by the umask and ignored for a file that already exists
            # (one written by an older version with 0644): set it outright.
            os.fchmod(fd, FILE_MODE)
        except OSError as exc:  # not ours to change (e.g. another owner): log and go on
            logger.warning("BoN log %s: cannot set mode 0600: %s", self.path, exc)
        self._fd = fd
        self._size = os.fstat(fd).st_size

    def _close_file(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _rotate(self) -> None:
        for i in range(self.backups - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{i}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def _maybe_rotate(self, incoming: int) -> None:
        if self._size == 0 or self._size + incoming <= self.max_bytes:
            return
        if time.monotonic() < self._rotate_after:
            return
        try:
            # Renamed while still open: on POSIX our descriptor follows the file, so if a rename
            # fails we still hold the current file and simply keep appending to it.
            self._rotate()
        except OSError as exc:
            self._rotate_after = time.monotonic() + self.rotate_retry_s
            self._failed(
                "rotation",
                exc,
                f"appending to the current file, retrying in {self.rotate_retry_s:g} s",
            )
            return
        self._recovered("rotation")
        self._close_file()
        self._open()

    def _append(self, line: bytes) -> None:
        assert self._fd is not None
        view = memoryview(line)
        try:
            while view:  # os.write may write part of it (near a full disk)
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError:
            # Part of the line may be in the file: close, so the next _open cuts it off.
            self._close_file()
            raise
        self._size += len(line)

    def _write(self, record: Record) -> None:
        if self._redact is not None:
            out = self._redact(record)
            if out is None:
                with self._count_lock:
                    self.skipped += 1
                return
            if not isinstance(out, dict):
                raise TypeError(f"the redactor returned {type(out).__name__}, not a dict or None")
            record = out
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        if self._fd is None:  # closed by an earlier failure: reopen (and repair) now
            self._open()
        self._maybe_rotate(len(line))
        self._append(line)
        with self._count_lock:
            self.written += 1
        if self._metrics is not None:
            self._metrics.bon_log_written.inc()

    def _failed(self, what: str, exc: BaseException, then: str) -> None:
        # Once per failing spell, with the traceback; a full disk would otherwise log per record.
        if what not in self._failing:
            self._failing.add(what)
            logger.error("BoN log %s: %s failed (%s); %s", self.path, what, exc, then, exc_info=exc)
        else:
            logger.debug("BoN log %s: %s failed again: %s", self.path, what, exc)

    def _recovered(self, what: str) -> None:
        if what in self._failing:
            self._failing.discard(what)
            logger.warning(
                "BoN log %s: %s works again (%d records dropped so far)",
                self.path,
                what,
                self.dropped,
            )

    def _run(self) -> None:
        try:
            while True:
                item = self._q.get()
                if item is _STOP:
                    break
                try:
                    self._write(item)
                except Exception as exc:
                    # Whatever one record does (disk full, a redactor bug, unserialisable data),
                    # the thread must live on for the next: count it, log it, carry on.
                    self._drop("error")
                    self._failed("write", exc, "record dropped")
                else:
                    self._recovered("write")
        finally:
            try:
                self._close_file()
            except OSError:
                logger.exception("BoN log %s: close failed", self.path)

    def close(self, timeout: float = 10.0) -> None:
        try:
            # Bounded: a writer stuck on a hung disk with a full queue must not hang shutdown.
            self._q.put(_STOP, timeout=timeout)
        except queue.Full:
            logger.warning("BoN log %s: writer did not drain its queue; not waiting", self.path)
            return
        self._thread.join(timeout)
