"""The wake-up side of the relay: a dedicated LISTEN connection with a self-heartbeat.

``wait`` returns True when a producer's trigger signalled new rows. Every ``heartbeat`` seconds
the listener NOTIFYs itself and expects to hear it back; a connection that stays silent is deaf
(half-open TCP, a proxy that dropped it) and ``wait`` raises so the relay reconnects.
A connection error also propagates: the relay reconnects and drains before it waits again,
because notifications sent while it was away are gone while the rows are not.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, Protocol

import psycopg
from psycopg import sql

from .errors import DatabaseUnavailable

_SLICE = 0.25


class Waiter(Protocol):
    """What the drain loop waits on; poll-only mode uses :class:`Sleeper`."""

    mode: str

    def wait(self, timeout: float, stop: Callable[[], bool]) -> bool: ...

    def close(self) -> None: ...


class Listener:
    mode = "notify"

    def __init__(self, conninfo: str, channel: str, app_name: str, heartbeat: float) -> None:
        self._channel = channel
        self._heartbeat = heartbeat
        self._token = f"heartbeat:{os.getpid()}:{id(self)}"
        self._conn: psycopg.Connection[Any] = psycopg.connect(
            conninfo, autocommit=True, application_name=app_name
        )
        self._conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        self._next_beat = time.monotonic() + heartbeat
        self._beat_deadline: float | None = None
        self.notifications = 0

    def wait(self, timeout: float, stop: Callable[[], bool]) -> bool:
        """Wait up to ``timeout`` s for a data notification; False on timeout or stop."""
        end = time.monotonic() + timeout
        while not stop():
            now = time.monotonic()
            self._beat(now)
            left = end - now
            if left <= 0:
                return False
            woke = False
            for note in self._conn.notifies(timeout=min(_SLICE, left), stop_after=1):
                if note.payload == self._token:
                    self._beat_deadline = None
                else:
                    woke = True
            if woke:
                # take every notification already queued: one wake-up serves them all
                for _ in self._conn.notifies(timeout=0):
                    pass
                self.notifications += 1
                return True
        return False

    def _beat(self, now: float) -> None:
        if self._beat_deadline is not None and now > self._beat_deadline:
            raise DatabaseUnavailable("LISTEN connection is deaf: its heartbeat did not come back")
        if now >= self._next_beat and self._beat_deadline is None:
            self._conn.execute("SELECT pg_notify(%s, %s)", (self._channel, self._token))
            self._beat_deadline = now + max(5.0, self._heartbeat)
            self._next_beat = now + self._heartbeat

    def close(self) -> None:
        self._conn.close()


class Sleeper:
    """Poll-only mode: no LISTEN (works behind PgBouncer in transaction pooling)."""

    mode = "poll"

    def wait(self, timeout: float, stop: Callable[[], bool]) -> bool:
        end = time.monotonic() + timeout
        while not stop():
            left = end - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(_SLICE, left))
        return False

    def close(self) -> None:
        pass
