"""Sinks publish outbox rows somewhere (Kafka, HTTP webhooks) behind one interface."""

from .base import Outcome, Sink

__all__ = ["Outcome", "Sink"]
