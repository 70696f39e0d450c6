"""Logging set-up: one JSON object per line when stderr is not a TTY, readable lines when it is.

``OUTBOX_LOG_FORMAT=auto|json|text`` (default ``auto``) and ``OUTBOX_LOG_LEVEL``. Structured
fields go in ``extra=`` (``log.debug("batch", extra={"shard": 3, "rows": 100})``); they become
JSON keys, or ``key=value`` pairs after the message in text mode.

Nothing here logs payloads, and a redaction filter removes what looks like a secret from every
line as a last line of defence: passwords in URLs and libpq connection strings, ``whsec_``
webhook secrets, ``Authorization`` / ``Bearer`` values.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import sys
from typing import Any, TextIO

#: LogRecord attributes that are not structured fields.
_STANDARD = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
    | {"message", "asctime", "taskName"}
)

_SECRETS = (
    (re.compile(r"(://[^:/@\s]+):[^@\s]*@"), r"\1:***@"),
    (
        re.compile(r"(?i)\b(password|passwd|sasl\.password|secret)(\s*[=:]\s*)('[^']*'|\S+)"),
        r"\1\2***",
    ),
    (re.compile(r"whsec_[A-Za-z0-9+/=]+"), "whsec_***"),
    (re.compile(r"(?i)\b(authorization|bearer)(\s*[=:]?\s*)([A-Za-z0-9._~+/=-]{8,})"), r"\1\2***"),
)


def redact(text: str) -> str:
    """``text`` with anything that looks like a secret replaced by ``***``."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def _jsonable(value: Any) -> Any:
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return str(value)


class JsonFormatter(logging.Formatter):
    """``{"ts": ..., "level": ..., "logger": ..., "msg": ..., <extra fields>}`` per line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for key, value in _fields(record).items():
            out.setdefault(key, _jsonable(value))
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``2026-11-25 12:00:01,123 INFO outbox_relay.relay: message  key=value ...``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = _fields(record)
        if extra:
            line += "  " + " ".join(f"{k}={_short(v)}" for k, v in extra.items())
        return redact(line)


def _short(value: Any) -> str:
    if isinstance(value, list | tuple) and len(value) > 8:
        return f"[{', '.join(map(str, value[:8]))}, ... {len(value)} items]"
    return str(value)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler this module installed, so a second set-up replaces it."""


def use_json(fmt: str, stream: TextIO) -> bool:
    if fmt == "json":
        return True
    if fmt == "text":
        return False
    isatty = getattr(stream, "isatty", None)
    return not (isatty is not None and isatty())


def setup_logging(level: str, fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure the root logger: ``level``, and JSON or text per ``fmt`` (``auto`` = JSON unless
    ``stream`` is a TTY). Idempotent; other handlers are left alone."""
    stream = stream or sys.stderr
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _Handler):
            root.removeHandler(handler)
    handler = _Handler(stream)
    handler.setFormatter(JsonFormatter() if use_json(fmt, stream) else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level)


__all__ = ["JsonFormatter", "TextFormatter", "redact", "setup_logging", "use_json"]
