"""The interface between the drain loop and a sink.

The relay hands a sink a batch of rows in id order and gets back one :class:`Outcome` per row.
A sink must keep the order of rows with the same key, and once a row of a key fails it must not
deliver later rows of that key from the same batch (it returns ``Outcome.skip()`` for them).

A sink that keeps state per shard (the exactly-once Kafka sink) also implements
:class:`ShardHooks`: the relay tells it when it takes and drops a shard's lease, and asks after
every round which shards it must give up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

from ..store import OutboxRow


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one row: delivered, failed (retry later), or not attempted."""

    delivered: bool
    error: str | None = None
    #: the sink's own hint for the next attempt (e.g. HTTP Retry-After), in seconds
    retry_after: float | None = None
    #: False for :meth:`defer`: the sink held the row back (e.g. its webhook endpoint answered
    #: 410 Gone) and the attempt should not count towards ``max_attempts``. A relay that does not
    #: look at this field records it like any failure, which is the safe fallback.
    counts_attempt: bool = True

    @property
    def failed(self) -> bool:
        return not self.delivered and self.error is not None

    @classmethod
    def ok(cls) -> Outcome:
        return _OK

    @classmethod
    def fail(cls, error: str, retry_after: float | None = None) -> Outcome:
        return cls(False, error, retry_after)

    @classmethod
    def skip(cls) -> Outcome:
        return _SKIP

    @classmethod
    def defer(cls, error: str, retry_after: float | None = None) -> Outcome:
        """Not delivered and held back on purpose: retry after ``retry_after`` s, keep pending."""
        return cls(False, error, retry_after, counts_attempt=False)


_OK = Outcome(True)
_SKIP = Outcome(False)


class Sink(Protocol):
    """What the relay needs of a sink."""

    name: str

    def check(self) -> None:
        """Raise :class:`~outbox_relay.errors.SinkUnavailable` if the sink cannot be reached."""

    def publish(self, rows: Sequence[OutboxRow], timeout: float) -> list[Outcome]:
        """Deliver ``rows``; return one outcome per row, in the same order.

        Raises :class:`~outbox_relay.errors.FatalSinkError` for errors retrying cannot fix.
        """
        ...

    def close(self, timeout: float) -> None:
        """Flush and release resources."""


@runtime_checkable
class Pipelined(Protocol):
    """Optional: a sink whose publishing comes in two steps, so that the relay can read its
    next batch from the database while this one's acknowledgements are awaited."""

    def send(self, rows: Sequence[OutboxRow], timeout: float) -> Callable[[], list[Outcome]]:
        """Start delivering ``rows`` and return at once. The callable returned waits (at most
        ``timeout`` seconds from the call to ``send``) and returns the outcomes, as
        :meth:`Sink.publish` would; it is called exactly once, before the next ``send``."""
        ...


class Delivered(NamedTuple):
    """What a sink found it had already delivered of a shard (see :meth:`ShardHooks.recover`)."""

    ids: list[int]
    #: the latest ``created_at`` (Unix seconds, the database's clock) among those rows, if
    #: known: a row written later is not one of them, whatever its id (ids start again after
    #: ``TRUNCATE ... RESTART IDENTITY`` or a re-created table; the sink's record outlives that)
    created_max: float | None = None


@runtime_checkable
class ShardHooks(Protocol):
    """Optional: a sink that must act when the relay takes or drops a shard's lease."""

    def recover(self, shards: Sequence[int]) -> dict[int, Delivered]:
        """Called right after the relay took the leases of ``shards``, before anything of them
        is published: prepare each shard and return, per shard, the outbox ids the sink already
        delivered but the previous owner may not have marked sent. The relay marks them sent
        with its new epoch (only rows written no later than ``created_max``). A shard missing
        from the result could not be prepared now: the relay gives its lease back and tries
        again later (so does a :class:`~outbox_relay.errors.SinkError`); a
        :class:`~outbox_relay.errors.FatalSinkError` stops the relay."""
        ...

    def release(self, shard: int) -> None:
        """Called when the relay no longer owns ``shard`` (released, lost, connection gone)."""

    def lost_shards(self) -> set[int]:
        """Shards the sink found it may no longer publish for (fenced by another owner, or a
        commit whose outcome is unknown) since the last call; the relay drops their leases, and
        takes them again, with :meth:`recover`, at a later rebalance."""
        ...
