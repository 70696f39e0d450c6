"""The single exception hierarchy of outbox-relay.

Every error the package raises on purpose derives from :class:`OutboxError`, so callers can catch
one type. Database and Kafka exceptions are wrapped with context (which shard, which ids, which
setting) and chained with ``raise ... from``, never swallowed.
"""

from __future__ import annotations


class OutboxError(Exception):
    """Base class of every error raised by outbox-relay."""


class ConfigError(OutboxError):
    """A setting is missing or invalid. The message names the setting."""


class InvalidMessage(OutboxError, ValueError):
    """A message handed to ``enqueue`` cannot be stored (empty topic, bad headers, ...)."""


class PayloadTooLarge(InvalidMessage):
    """The encoded payload is larger than ``OUTBOX_MAX_PAYLOAD_BYTES``."""


class WrongSessionType(OutboxError, TypeError):
    """``enqueue`` was given something that is not a SQLAlchemy session or connection."""


class OutboxTableMissing(OutboxError):
    """The outbox table does not exist in the database: run ``outbox-relay migrate``."""


class SchemaMismatch(OutboxError):
    """The database schema is not at the revision this package expects."""


class DatabaseUnavailable(OutboxError):
    """The database cannot be reached or the connection was lost."""


class ProxyDetected(ConfigError):
    """Leases are enabled but the relay talks to Postgres through a transaction-pooling proxy."""


class SinkError(OutboxError):
    """A sink (Kafka, webhook) failed in a way that stops the relay."""


class SinkUnavailable(SinkError):
    """The sink cannot be reached at start-up (bad bootstrap servers, broker down)."""


class FatalSinkError(SinkError):
    """The sink reported an error that retrying cannot fix (fencing, authorisation)."""


class LeaseLost(OutboxError):
    """The relay no longer holds the lease of a shard it was working on."""


__all__ = [
    "ConfigError",
    "DatabaseUnavailable",
    "FatalSinkError",
    "InvalidMessage",
    "LeaseLost",
    "OutboxError",
    "OutboxTableMissing",
    "PayloadTooLarge",
    "ProxyDetected",
    "SchemaMismatch",
    "SinkError",
    "SinkUnavailable",
    "WrongSessionType",
]


# ---------------------------------------------------------------------- consumer inbox
class InboxError(OutboxError):
    """Base class of the errors of the consumer inbox helper (``outbox_relay.inbox``)."""


class InboxTableMissing(InboxError):
    """The inbox tables do not exist: run ``outbox-relay migrate --inbox`` (or the alembic branch
    ``outbox_relay_inbox``)."""


class SequenceGap(InboxError):
    """A message's ``outbox-seq`` is beyond the next expected one: an earlier message of the key is
    missing. Nothing was recorded; do not commit the transaction nor acknowledge the message."""

    def __init__(
        self,
        message: str,
        *,
        topic: str,
        key: str,
        expected: int,
        got: int,
        idempotency_key: str,
    ) -> None:
        super().__init__(message)
        self.topic = topic
        self.key = key
        self.expected = expected
        self.got = got
        self.idempotency_key = idempotency_key


class WebhookVerificationError(InboxError, ValueError):
    """A webhook request is not authentic: a Standard Webhooks header is missing or malformed, or no
    signature matches any of the secrets."""


class WebhookTimestampError(WebhookVerificationError):
    """A webhook's ``webhook-timestamp`` is outside the tolerance (too old: a replay or a long
    delay; or in the future: clock skew)."""


__all__ += [
    "InboxError",
    "InboxTableMissing",
    "SequenceGap",
    "WebhookTimestampError",
    "WebhookVerificationError",
]
