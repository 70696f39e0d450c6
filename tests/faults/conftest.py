"""Fault-suite plumbing: every scenario's numbers are collected, printed as a table at the end of
the session and written to ``tests/faults/last-run.json`` (CI output, not committed)."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import pytest

RESULTS: list[dict[str, Any]] = []
OUT = Path(__file__).with_name("last-run.json")


@pytest.fixture
def record() -> Any:
    def add(report: Any, **extra: Any) -> None:
        row = report.as_dict()
        row.update(extra)
        RESULTS.append(row)

    return add


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not RESULTS:
        return
    OUT.write_text(
        json.dumps(
            {
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "machine": f"{platform.node()} {platform.machine()} {platform.python_version()}",
                "scenarios": RESULTS,
            },
            indent=2,
        )
    )


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not RESULTS:
        return
    cols = [
        "scenario",
        "committed",
        "delivered_unique",
        "lost",
        "unexpected",
        "duplicates",
        "order_violations",
        "rolled_back",
        "seconds",
    ]
    tr = terminalreporter
    tr.section("fault suite")
    tr.write_line(" ".join(f"{c:>16}" if i else f"{c:<28}" for i, c in enumerate(cols)))
    for r in RESULTS:
        tr.write_line(
            " ".join(f"{r[c]!s:>16}" if i else f"{r[c]!s:<28}" for i, c in enumerate(cols))
        )
    tr.write_line(f"written to {OUT}")
