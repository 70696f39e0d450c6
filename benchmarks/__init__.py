"""Benchmark harness of outbox-relay: ``python -m benchmarks.run`` (``make bench``)."""
