"""Drain rate by number of relay processes on one backlog (they split the shards by leases).

    python -m benchmarks.scale --rows 300000 --relays 1,2,3 --reps 2

A relay is one Python process: its produce loop and row decoding hold the GIL, and it waits for
each of its statements in turn. Several relays (replicas, or processes of one pod) overlap those
waits. Each repetition fills the same backlog, starts N relays at once and times spawn → last
delivery recorded (start-up and the shard split included); the raw producer sends the same
messages in the same run as the baseline. Counts alternate their order per repetition. Prints a
table and writes ``benchmarks/results/scale-<time>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import (
    RESULTS,
    BenchError,
    BenchOutbox,
    RelayProcess,
    log,
    median,
    payload_pool,
    services,
    topics,
)
from .drain import fill, topic_messages
from .kafka_bench import raw_throughput


def drain_with(box: BenchOutbox, n_relays: int, rows: int, logdir: Path, tag: str) -> float:
    """Spawn ``n_relays`` relays on the filled backlog; msg/s from the first spawn to the last
    delivery the relays recorded."""
    relays = [
        RelayProcess(box, logdir / f"{tag}-{i}.log", env={"OUTBOX_REBALANCE_INTERVAL": "0.5"})
        for i in range(n_relays)
    ]
    started = min(r.started_wall for r in relays)
    try:
        deadline = time.monotonic() + 3600
        while box.sent_span()[2] < rows:
            for r in relays:
                r.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"{n_relays} relay(s) did not drain {rows} rows in time")
            time.sleep(0.1)
        _, last, _ = box.sent_span()
    finally:
        codes = [r.stop() for r in relays]
    if any(codes):
        raise BenchError(f"relay exit codes {codes}; logs in {logdir}")
    return rows / (last.timestamp() - started)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=300_000)
    p.add_argument("--relays", default="1,2,3", help="comma list of relay counts")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--partitions", type=int, default=8)
    args = p.parse_args(argv)
    counts = [int(x) for x in args.relays.split(",")]
    try:
        svc = services()
    except BenchError as exc:
        print(f"benchmarks: error: {exc}", file=sys.stderr)
        return 2
    logdir = Path(tempfile.mkdtemp(prefix="outbox-scale-"))
    pool = payload_pool(1024, 1024)
    rates: dict[int, list[float]] = {n: [] for n in counts}
    raw: list[float] = []
    try:
        box = BenchOutbox.create(svc, args.shards)
        try:
            with topics(svc, args.partitions) as new_topic:
                for rep in range(args.reps):
                    raw.append(raw_throughput(svc, new_topic("raw"), args.rows, pool)["msgs_per_s"])
                    log(f"rep {rep + 1} raw producer: {raw[-1]:,.0f} msg/s")
                    for n in counts if rep % 2 == 0 else counts[::-1]:
                        topic = new_topic("scale")
                        fill(box, topic, args.rows, pool)
                        rate = drain_with(box, n, args.rows, logdir, f"r{rep}-{n}")
                        if topic_messages(svc, topic, args.partitions) < args.rows:
                            raise BenchError(f"fewer than {args.rows} messages reached {topic}")
                        rates[n].append(rate)
                        log(f"rep {rep + 1} {n} relay(s): {rate:,.0f} msg/s")
        finally:
            box.drop()
    except BenchError as exc:
        print(f"benchmarks: error: {exc}\n(relay logs in {logdir})", file=sys.stderr)
        return 1
    raw_median = median(raw)
    summary: dict[str, Any] = {}
    print(f"{'relays':>6} {'msg/s median':>12} {'ratio to raw':>12}  runs")
    for n in counts:
        m = median(rates[n])
        summary[str(n)] = {"msgs_per_s": round(m), "drain_ratio": round(m / raw_median, 3),
                           "msgs_per_s_runs": [round(x) for x in rates[n]]}
        print(f"{n:>6} {m:>12,.0f} {m / raw_median:>12.3f}  {[round(x) for x in rates[n]]}")
    stamp = dt.datetime.now(dt.UTC)
    out = RESULTS / f"scale-{stamp.strftime('%Y%m%dT%H%M%SZ')}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "timestamp": stamp.isoformat(timespec="seconds"), "rows": args.rows, "reps": args.reps,
        "raw_produce_msgs_per_s": round(raw_median),
        "raw_produce_msgs_per_s_runs": [round(x) for x in raw], "relays": summary,
    }, indent=2) + "\n")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
