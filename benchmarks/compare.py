"""Before/after: drain the same backlog with relay variants, interleaved, in one run.

    python -m benchmarks.compare --rows 100000 --reps 3 \\
        --variant before= \\
        --variant after=/path/to/changed/tree \\
        --variant after-big-batch=/path/to/changed/tree:OUTBOX_BATCH_SIZE=4000

A variant is ``NAME=[SOURCE_TREE][:ENV=VALUE[,ENV=VALUE...]]``: the relay runs from
``SOURCE_TREE`` (a directory holding an ``outbox_relay`` package; empty = the installed one) with
the extra environment; an entry ``table.PARAM=VALUE`` sets a storage parameter of the outbox
table before that variant's backlog is written instead (e.g. ``table.fillfactor=100``).
Repetitions alternate the order of the variants (ABC, CBA, ...) so a
noisy neighbour hurts every variant alike; ``--xmin-held`` keeps a transaction open in another
session meanwhile (see drain.py). The schema is migrated by the first variant's tree. Prints a
table and writes ``benchmarks/results/compare-<time>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import (
    KEYS,
    RESULTS,
    BenchError,
    BenchOutbox,
    log,
    median,
    payload_pool,
    services,
    topics,
)
from .drain import fill, relay_drain

#: variant entries with this prefix are storage parameters of the outbox table, not environment
TABLE = "table."


def parse_variant(text: str) -> tuple[str, str, dict[str, str]]:
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=[TREE][:ENV=VALUE,...], got {text!r}")
    tree, _, envs = rest.partition(":")
    env = {}
    for item in filter(None, envs.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"bad ENV=VALUE {item!r} in {text!r}")
        env[key] = value
    if tree and not Path(tree, "outbox_relay").is_dir():
        raise argparse.ArgumentTypeError(f"{tree} holds no outbox_relay package")
    return name, tree, env


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", type=parse_variant, required=True)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--xmin-held", action="store_true")
    p.add_argument("--keys", type=int, default=KEYS,
                   help="distinct message keys in the backlog (1: one hot key, one shard)")
    args = p.parse_args(argv)
    try:
        svc = services()
    except BenchError as exc:
        print(f"benchmarks: error: {exc}", file=sys.stderr)
        return 2
    first_tree = args.variant[0][1]
    if first_tree:
        os.environ["BENCH_RELAY_SRC"] = first_tree  # migrate with the first variant's tree
    else:
        os.environ.pop("BENCH_RELAY_SRC", None)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in args.variant}
    logdir = Path(tempfile.mkdtemp(prefix="outbox-compare-"))
    pool = payload_pool(1024, 1024)
    try:
        box = BenchOutbox.create(svc, args.shards)
        try:
            wanted = {k.removeprefix(TABLE) for _, _, env in args.variant for k in env
                      if k.startswith(TABLE)}
            defaults = box.storage_of(wanted)
            with topics(svc, args.partitions) as new_topic:
                for rep in range(args.reps):
                    order = args.variant if rep % 2 == 0 else args.variant[::-1]
                    for name, tree, env in order:
                        topic = new_topic("compare")
                        storage: dict[str, str | None] = {
                            k.removeprefix(TABLE): v for k, v in env.items() if k.startswith(TABLE)}
                        env = {k: v for k, v in env.items() if not k.startswith(TABLE)}
                        box.storage({**defaults, **storage})
                        fill(box, topic, args.rows, pool, args.keys)
                        d = relay_drain(box, topic, args.partitions, args.rows, logdir,
                                        0.1 if args.rows <= 200_000 else 0.5, 3600,
                                        hold_xmin=args.xmin_held, env=env, src=tree)
                        runs[name].append(d)
                        c = d["cores"]
                        log(f"rep {rep + 1} {name}: {d['msgs_per_s']:,.0f} msg/s (relay "
                            f"{c['relay']:.2f} cores, postgres {c['postgres']:.2f}, foreign "
                            f"{c['foreign']:.2f}; {d['relay_cpu_us_per_msg']:.1f} us/msg)")
        finally:
            box.drop()
    except BenchError as exc:
        print(f"benchmarks: error: {exc}\n(relay logs in {logdir})", file=sys.stderr)
        return 1
    print(f"{'variant':<28} {'msg/s median':>12}  runs")
    summary = {}
    for name, tree, env in args.variant:
        rates = [r["msgs_per_s"] for r in runs[name]]
        summary[name] = {"tree": tree or "(installed)", "env": env,
                         "msgs_per_s": round(median(rates)),
                         "msgs_per_s_runs": [round(x) for x in rates],
                         "relay_cpu_us_per_msg": round(
                             median([r["relay_cpu_us_per_msg"] for r in runs[name]]), 1),
                         "detail": runs[name]}
        print(f"{name:<28} {median(rates):>12,.0f}  {[round(x) for x in rates]}")
    stamp = dt.datetime.now(dt.UTC)
    out = RESULTS / f"compare-{stamp.strftime('%Y%m%dT%H%M%SZ')}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"timestamp": stamp.isoformat(timespec="seconds"),
                               "rows": args.rows, "reps": args.reps,
                               "keys": args.keys, "xmin_held": args.xmin_held,
                               "variants": summary},
                              indent=2, default=str) + "\n")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
