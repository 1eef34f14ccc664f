"""The settings reference, generated from a settings class so that it cannot drift: a markdown
table (docs/settings.md) and a commented .env.example. `python -m server.settings_doc` writes
both for the gateway's settings; tests/test_settings.py checks that the files are current."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel
from pydantic_settings import BaseSettings


def _default(value: Any) -> str:
    if isinstance(value, BaseModel):
        return json.dumps(value.model_dump(exclude_none=True))
    if hasattr(value, "get_secret_value"):
        return "(secret)"
    return str(value)


def rows(cls: type[BaseSettings]) -> list[tuple[str, str, str]]:
    """(variable, default, description) per field, in the class's order."""
    prefix = cls.model_config.get("env_prefix", "")
    return [
        (
            f"{prefix}{name}".upper(),
            _default(field.get_default(call_default_factory=True)),
            field.description or "",
        )
        for name, field in cls.model_fields.items()
    ]


def markdown(cls: type[BaseSettings], title: str, intro: str) -> str:
    lines = [f"# {title}", "", intro, "", "| variable | default | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{var}` | `{default}` | {desc} |" for var, default, desc in rows(cls)]
    return "\n".join(lines) + "\n"


def env_example(cls: type[BaseSettings], intro: str) -> str:
    lines = [f"# {line}" if line else "" for line in intro.splitlines()] + [""]
    for var, default, desc in rows(cls):
        lines += [f"# {desc}", f"# {var}={'' if default == 'None' else default}"]
    return "\n".join(lines) + "\n"
