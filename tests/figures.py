"""Figures of the reliability checks (inputs tried, 5xx seen, requests shed, RSS growth, faults
injected and survived), printed as one table at the end of the run and written to
runs/reliability/summary.{json,md}. A plugin of tests/conftest.py; tests ask for `figures`."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from vbon.adapters import write_json_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ("check", "inputs", "5xx", "shed", "rss_growth_mb", "faults", "survived", "note")
_ROWS: list[dict[str, Any]] = []
_STARTED = time.monotonic()


class Figures:
    """What a check tried and saw; one row per check in the summary table."""

    def add(self, check: str, **fields: Any) -> None:
        unknown = set(fields) - set(COLUMNS)
        assert not unknown, f"unknown summary columns {unknown}"
        _ROWS.append({"check": check, **fields})


@pytest.fixture(scope="session")
def figures() -> Figures:
    return Figures()


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def summary_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _ROWS:
        return
    import datetime
    import sys

    from vbon.report import machine_line, machine_stamp

    out = Path(os.environ.get("VBON_RELIABILITY_DIR", ROOT / "runs" / "reliability"))
    out.mkdir(parents=True, exist_ok=True)
    failed = len(terminalreporter.stats.get("failed", [])) + len(
        terminalreporter.stats.get("error", [])
    )
    machine = machine_stamp()
    command = os.environ.get("VBON_RELIABILITY_COMMAND") or "pytest " + " ".join(sys.argv[1:])
    minutes = (time.monotonic() - _STARTED) / 60
    table = summary_markdown(_ROWS)
    header = (
        "# Reliability checks\n\n"
        f"Written by `{command}` on {datetime.date.today().isoformat()} ({minutes:.0f} min): "
        f"{machine_line(machine)}. "
        + ("Every row is a passing test. " if not failed else f"**{failed} tests FAILED.** ")
        + "What each check proves: [docs/reliability.md](../../reliability.md). 5xx in the "
        "reward row are the injected reward failures, answered 500 `reward_model_error` by "
        "design.\n\n"
    )
    write_text_atomic(out / "summary.md", header + table)
    write_json_atomic(
        out / "summary.json",
        {"command": command, "machine": machine, "failed": failed, "rows": _ROWS},
    )
    terminalreporter.write_sep("=", "reliability summary")
    terminalreporter.write(table)
    terminalreporter.write_line(f"(written to {out}/summary.md and summary.json)")
