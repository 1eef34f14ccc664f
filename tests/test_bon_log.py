"""The BoN log under failure (#29 point 15): a failed rotation or any error on one record never
kills the writer, lost records are counted in /metrics, files are owner-only, and the redaction
hook rewrites or skips records before they reach the disk."""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

import server.bon_log as bon_log_mod
from server.bon_log import BoNLog, load_redactor
from server.metrics import Metrics
from tests.test_server_api import make_client


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def settled(log: BoNLog, n: int) -> Callable[[], bool]:
    """True once the writer has dealt with n records (written, dropped or skipped)."""
    return lambda: log.written + log.dropped + getattr(log, "skipped", 0) >= n


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def metric(metrics: Metrics, line_start: str) -> float:
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{line_start} not exported")


@pytest.fixture
def make_log(tmp_path: Path) -> Iterator[Callable[..., BoNLog]]:
    made: list[BoNLog] = []

    def make(**kw: Any) -> BoNLog:
        kw.setdefault("max_bytes", 1024)
        kw.setdefault("backups", 2)
        log = BoNLog(tmp_path / "bon.jsonl", **kw)
        made.append(log)
        return log

    yield make
    for log in made:
        log.close()


def test_a_failed_rotation_keeps_the_writer_appending(
    make_log: Callable[..., BoNLog],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "bon.jsonl"
    log = make_log()
    log.rotate_retry_s = 0  # retry on every record, to show the error is still logged once

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bon_log_mod.os, "replace", disk_full)
    with caplog.at_level(logging.ERROR, logger="server.bon_log"):
        for i in range(30):  # ~100 bytes each: the 1024-byte limit is passed ~20 times over
            log.log(f"p{i}", ["r" * 80], [0.5])
        wait_for(settled(log, 30))
    assert log._thread.is_alive()
    assert (log.written, log.dropped) == (30, 0)
    assert [r["prompt"] for r in rows(path)] == [f"p{i}" for i in range(30)]
    assert path.stat().st_size > 1024 and not path.with_name("bon.jsonl.1").exists()
    assert sum("rotation failed" in r.getMessage() for r in caplog.records) == 1

    monkeypatch.undo()  # the disk has room again: the next record rotates
    log.log("after", ["r"], [0.5])
    wait_for(settled(log, 31))
    assert [r["prompt"] for r in rows(path)] == ["after"]
    assert len(rows(path.with_name("bon.jsonl.1"))) == 30


def test_a_record_that_fails_is_dropped_and_the_writer_goes_on(
    make_log: Callable[..., BoNLog], tmp_path: Path
) -> None:
    log = make_log()
    log.log("bad", [object()], [0.0])  # type: ignore[list-item]  # not JSON: json.dumps raises
    log.log("good", ["r"], [1.0])
    wait_for(settled(log, 2))
    assert log._thread.is_alive()
    assert (log.written, log.dropped) == (1, 1)
    assert [r["prompt"] for r in rows(tmp_path / "bon.jsonl")] == ["good"]


def test_a_partial_write_is_cut_before_the_next_record(
    make_log: Callable[..., BoNLog], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "bon.jsonl"
    log = make_log()
    log.log("first", ["r"], [0.0])
    wait_for(settled(log, 1))
    real_write = os.write
    calls = 0

    def half_then_full(fd: int, data: Any) -> int:  # the disk fills up mid-line
        nonlocal calls
        calls += 1
        if calls == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bon_log_mod.os, "write", half_then_full)
    log.log("lost", ["r"], [0.0])
    wait_for(settled(log, 2))
    assert not path.read_bytes().endswith(b"\n")  # half a line is on disk
    monkeypatch.undo()
    log.log("third", ["r"], [0.0])
    wait_for(settled(log, 3))
    assert (log.written, log.dropped) == (2, 1)
    assert [r["prompt"] for r in rows(path)] == ["first", "third"]  # every line parses


def test_dropped_and_written_records_are_counted_in_metrics(
    make_log: Callable[..., BoNLog],
) -> None:
    metrics = Metrics()
    release = threading.Event()
    started = threading.Event()

    def slow(record: dict[str, Any]) -> dict[str, Any]:  # a writer that cannot keep up
        started.set()
        release.wait(5)
        return record

    log = make_log(metrics=metrics, redact=slow, max_queue=1)
    # Both reasons are exported from the start, so an alert on them has a series to read.
    assert metric(metrics, 'vbon_bon_log_dropped_total{reason="queue_full"}') == 0
    assert metric(metrics, 'vbon_bon_log_dropped_total{reason="error"}') == 0
    log.log("in the writer", [], [])
    assert started.wait(5)
    log.log("bad", [object()], [])  # type: ignore[list-item]  # queued; fails in json.dumps
    log.log("no room", [], [])
    assert metric(metrics, 'vbon_bon_log_dropped_total{reason="queue_full"}') == 1
    release.set()
    wait_for(settled(log, 3))
    assert metric(metrics, 'vbon_bon_log_dropped_total{reason="error"}') == 1
    assert metric(metrics, "vbon_bon_log_written_total") == 1
    assert (log.written, log.dropped) == (1, 2)


def test_files_are_owner_only_whatever_the_umask(
    make_log: Callable[..., BoNLog], tmp_path: Path
) -> None:
    path = tmp_path / "bon.jsonl"
    old = os.umask(0o022)
    try:
        log = make_log()
        wait_for(path.exists)
        assert mode(path) == 0o600
        for i in range(30):  # past max_bytes: rotates
            log.log(f"p{i}", ["r" * 80], [0.5])
        wait_for(settled(log, 30))
        assert path.with_name("bon.jsonl.1").exists()
        assert mode(path) == 0o600 and mode(path.with_name("bon.jsonl.1")) == 0o600
        log.close()
        # A log left world-readable by an older version is tightened when it is opened.
        os.chmod(path, 0o644)
        make_log()
        assert mode(path) == 0o600
    finally:
        os.umask(old)


def test_the_redactor_rewrites_or_skips_records(
    make_log: Callable[..., BoNLog], tmp_path: Path
) -> None:
    redact = load_redactor("tests.bon_log_redactors:mask_and_skip")
    log = make_log(redact=redact)
    log.log("call 555 1234", ["r"], [0.1])
    log.log("a secret prompt", ["r"], [0.2])
    log.log("plain", ["r"], [0.3])
    wait_for(settled(log, 3))
    assert [r["prompt"] for r in rows(tmp_path / "bon.jsonl")] == ["call ### ####", "plain"]
    assert (log.written, log.skipped, log.dropped) == (2, 1, 0)


def test_a_redactor_that_raises_drops_the_record_never_logs_it_raw(
    make_log: Callable[..., BoNLog], tmp_path: Path
) -> None:
    log = make_log(redact=load_redactor("tests.bon_log_redactors:broken"))
    log.log("raw prompt", ["r"], [0.1])
    wait_for(settled(log, 1))
    assert log.dropped == 1 and log._thread.is_alive()
    assert (tmp_path / "bon.jsonl").read_text() == ""


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "expected 'package.module:function'"),
        ("tests.no_such_module:f", "cannot import 'tests.no_such_module'"),
        ("tests.bon_log_redactors:missing", "has no attribute 'missing'"),
        ("tests.bon_log_redactors:NOT_CALLABLE", "is not callable"),
    ],
)
def test_a_bad_redactor_setting_is_a_clear_error(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match="VBON_BON_LOG_REDACT") as exc:
        load_redactor(spec)
    assert message in str(exc.value)


def test_the_gateway_redacts_and_exports_bon_log_counts(tmp_path: Path) -> None:
    log = tmp_path / "bon.jsonl"
    with make_client(
        tmp_path, bon_log_path=log, bon_log_redact="tests.bon_log_redactors:mask_and_skip"
    ) as c:
        for prompt in ("order 42", "secret"):
            assert c.post("/v1/bon", json={"prompt": prompt, "n": 2}).status_code == 200
        wait_for(lambda: "vbon_bon_log_written_total 1.0" in c.get("/metrics").text)
        text = c.get("/metrics").text
    assert [r["prompt"] for r in rows(log)] == ["order ##"]
    assert mode(log) == 0o600
    assert 'vbon_bon_log_dropped_total{reason="queue_full"} 0.0' in text


def test_an_unimportable_redactor_fails_start_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with make_client(
        tmp_path, bon_log_path=tmp_path / "bon.jsonl", bon_log_redact="tests.nope:redact"
    ) as c:
        r = c.get("/ready")
        assert r.status_code == 503 and "start-up failed" in r.json()["reason"]
    # Clients get a reference; the log says why.
    assert "VBON_BON_LOG_REDACT='tests.nope:redact': cannot import" in caplog.text
