"""Redaction hooks for the BoN log tests (VBON_BON_LOG_REDACT='tests.bon_log_redactors:…')."""

from __future__ import annotations

from typing import Any

NOT_CALLABLE = 42


def mask_and_skip(record: dict[str, Any]) -> dict[str, Any] | None:
    """Skips prompts marked 'secret'; masks digits in the others (as a PII scrubber would)."""
    if "secret" in record["prompt"]:
        return None
    masked = "".join("#" if ch.isdigit() else ch for ch in record["prompt"])
    return {**record, "prompt": masked}


def broken(record: dict[str, Any]) -> dict[str, Any] | None:
    raise RuntimeError("redactor bug")
