"""Fault-suite plumbing: every scenario's numbers are collected, printed as a table at the end of
the session and written to ``tests/faults/last-run.json`` (CI output, not committed)."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import pytest

from ..conftest import Outbox

RESULTS: list[dict[str, Any]] = []
OUT = Path(__file__).with_name("last-run.json")


@pytest.fixture(autouse=True)
def committed_log(outbox: Outbox) -> None:
    """Ground truth of what committed: a row trigger copies every outbox row's identity into
    ``committed_log`` in the producer's own transaction (so it commits or rolls back with it).
    The outbox itself cannot be the record: the relay deletes rows once they are delivered."""
    log = f'"{outbox.schema}".committed_log'
    fn = f'"{outbox.schema}".log_committed'
    outbox.sql(f"CREATE TABLE {log} (idempotency_key text PRIMARY KEY, id bigint, key text)")
    outbox.sql(
        f"CREATE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        f" INSERT INTO {log} VALUES (NEW.idempotency_key, NEW.id, NEW.key); RETURN NULL; END $$"
    )
    outbox.sql(
        f"CREATE TRIGGER log_committed AFTER INSERT ON {{t}} FOR EACH ROW EXECUTE FUNCTION {fn}()"
    )


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
