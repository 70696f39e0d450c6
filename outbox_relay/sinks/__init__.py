"""Sinks publish outbox rows somewhere (Kafka, HTTP webhooks) behind one interface."""

from .base import Outcome, ShardHooks, Sink

__all__ = ["Outcome", "ShardHooks", "Sink"]
