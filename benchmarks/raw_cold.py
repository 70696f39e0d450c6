"""A raw confluent-kafka producer as a program of its own, timed from its process' spawn.

The relay's drain of a backlog is timed from the relay's spawn: interpreter start, imports,
connections and the producer's first metadata and idempotent producer id all count. This is
the same job for a bare producer, counted the same way: start, connect (a metadata request,
as the relay's start-up makes), produce ``rows`` messages (keys, values and headers as the
relay sends them), flush. The parent process (:func:`benchmarks.kafka_bench.raw_cold_throughput`)
notes the wall clock before it spawns this script and subtracts it from the ``done`` clock
printed here.

It imports only the standard library and confluent-kafka, as a minimal producer would: run it
as a file (``python benchmarks/raw_cold.py SPEC``), not as a module of the ``benchmarks``
package, whose imports (psycopg, the relay's settings) a bare producer would not pay.

``SPEC`` is a JSON file: ``config`` (librdkafka settings), ``topic``, ``rows``, ``keys`` and
``key_format`` (message ``i`` has key ``key_format.format(i % keys)``), ``pool`` (a file of
payloads, one per line), ``headers`` (the names of the idempotency key, outbox id and
content-type headers), ``ikey_format`` and ``content_type``.
"""

from __future__ import annotations

import json
import sys
import time

from confluent_kafka import KafkaError, Message, Producer


def main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    with open(spec["pool"], "rb") as f:
        pool = f.read().split(b"\n")
    producer = Producer(spec["config"])
    # connect first, as the relay does (its reachability check): an idempotent producer whose
    # first message comes before its broker connection is up waits ~0.5 s more for its
    # producer id (librdkafka retries that on a timer)
    producer.list_topics(timeout=30)
    topic, rows, keys, key_format = spec["topic"], spec["rows"], spec["keys"], spec["key_format"]
    h_ikey, h_id, h_ctype = spec["headers"]
    ikey_format, ctype = spec["ikey_format"], spec["content_type"].encode()
    errors: list[str] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            errors.append(err.str())

    produce, poll, size = producer.produce, producer.poll, len(pool)
    for i in range(rows):
        headers = [(h_ikey, ikey_format.format(i).encode()), (h_id, str(i + 1).encode()),
                   (h_ctype, ctype)]
        while True:
            try:
                produce(topic, pool[i % size], key_format.format(i % keys), headers=headers,
                        on_delivery=on_delivery)
                break
            except BufferError:
                poll(0.005)
    left = producer.flush(300)
    done = time.time()
    print(json.dumps({"done": done, "left": left, "errors": errors[:3],
                      "error_count": len(errors)}))
    return 0 if not left and not errors else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
