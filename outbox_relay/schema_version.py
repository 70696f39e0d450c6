"""The schema revision this package expects, without the SQLAlchemy definitions of
:mod:`~outbox_relay.schema` (the relay reads these at start-up; it never needs the rest)."""

#: Revision identifier the migrations write into ``<table>_meta`` at head.
SCHEMA_REVISION = "0003"
#: Schema versions: 1 = the outbox and its companions; 2 = per-key sequences in commit order
#: (``seq`` column, ``<table>_keyseq`` counters, deferred sequencing trigger); 3 = delivery
#: counters (``<table>_sent_stats``), so rows can be deleted when sent and still be counted.
LATEST = 3
#: Width of one ``<table>_sent_stats`` bucket, in seconds.
SENT_STATS_BUCKET = 10
