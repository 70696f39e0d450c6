"""Shared pieces of the benchmarks: services, a scratch outbox schema, the relay as a subprocess,
messages, statistics and CPU accounting.

Everything runs against the local services of ``make services`` (``. .dev/env``). A benchmark that
cannot reach a service raises :class:`BenchError`; the harness then exits non-zero and writes
nothing, so a missing service never shows up as a zero.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from outbox_relay.settings import conninfo, load_settings
from outbox_relay.sinks.kafka import producer_config

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
BIN_DIR = Path(sys.executable).parent
RELAY_BIN = BIN_DIR / "outbox-relay"
PGBENCH = Path(os.environ.get("OUTBOX_PG_BIN", "/usr/lib/postgresql/15/bin")) / "pgbench"

#: Headers the relay adds to every Kafka message (see outbox_relay.sinks.kafka).
H_IKEY, H_ID, H_CTYPE = "idempotency-key", "outbox-id", "content-type"


class BenchError(Exception):
    """A benchmark cannot run (service missing, relay died, timeout): no number is written."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- services
@dataclass(frozen=True)
class Services:
    db_url: str  # SQLAlchemy-style URL, as the relay takes it
    bootstrap: str

    @property
    def dsn(self) -> str:
        return conninfo(self.db_url)

    def connect(self, **kw: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn, autocommit=True, **kw)

    def admin(self) -> AdminClient:
        # failures surface as exceptions; librdkafka's own log would repeat them every 50 ms
        return AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})

    def producer_config(self, **override: Any) -> dict[str, Any]:
        """Exactly the relay's librdkafka settings (``producer_config``), plus ``override``."""
        settings = load_settings(kafka_bootstrap_servers=self.bootstrap, relay_name="bench")
        cfg = producer_config(settings)
        cfg.update(override)
        return cfg


def services() -> Services:
    """The services from ``.dev/env``; :class:`BenchError` with a clear line if one is missing."""
    url = os.environ.get("BENCH_DATABASE_URL") or os.environ.get("OUTBOX_DATABASE_URL")
    bootstrap = os.environ.get("OUTBOX_KAFKA_BOOTSTRAP_SERVERS")
    if not url or not bootstrap:
        raise BenchError(
            "OUTBOX_DATABASE_URL / OUTBOX_KAFKA_BOOTSTRAP_SERVERS are not set: run "
            "`make services` and `. .dev/env` (or use `make bench`)"
        )
    svc = Services(url, bootstrap)
    try:
        with svc.connect(connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "?"
        raise BenchError(
            f"Postgres at {url} is unreachable ({first}): run `make services`"
        ) from None
    try:
        svc.admin().list_topics(timeout=10)
    except KafkaException as exc:
        raise BenchError(
            f"Kafka at {bootstrap} is unreachable ({exc}): run `make services`"
        ) from None
    if not PGBENCH.exists():
        raise BenchError(f"pgbench not found at {PGBENCH} (set OUTBOX_PG_BIN)")
    return svc


def unique(prefix: str) -> str:
    return f"{prefix}_{time.strftime('%H%M%S')}_{uuid.uuid4().hex[:6]}"


# --------------------------------------------------------------------------- topics
class ProgressTopic:
    """The progress topic of the exactly-once relays of one phase: its name, the relay
    environment that selects exactly-once mode with it, and its deletion at the end."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.name = f"bench.progress.{uuid.uuid4().hex[:10]}"
        self.env = {"OUTBOX_KAFKA_EXACTLY_ONCE": "true", "OUTBOX_KAFKA_PROGRESS_TOPIC": self.name}

    def drop(self) -> None:
        with contextlib.suppress(Exception):
            for fut in self.svc.admin().delete_topics([self.name], operation_timeout=30).values():
                fut.result(timeout=30)


@contextlib.contextmanager
def topics(svc: Services, partitions: int) -> Iterator[Callable[[str], str]]:
    """Yield ``new(label) -> topic name``; every topic created is deleted at exit."""
    admin = svc.admin()
    made: list[str] = []

    def new(label: str) -> str:
        name = f"bench.{label}.{uuid.uuid4().hex[:10]}"
        futures = admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1)]
        )
        for fut in futures.values():
            fut.result(timeout=30)
        made.append(name)
        # metadata settles before anybody produces
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            md = admin.list_topics(name, timeout=5).topics.get(name)
            if md is not None and md.error is None and len(md.partitions) == partitions:
                break
            time.sleep(0.05)
        return name

    try:
        yield new
    finally:
        if made:
            with contextlib.suppress(Exception):
                for fut in admin.delete_topics(made, operation_timeout=30).values():
                    fut.result(timeout=30)


# --------------------------------------------------------------------------- messages
KEYS = 1000
_WORDS = [
    "order", "customer", "shipped", "pending", "invoice", "paid", "refund", "express", "standard",
    "warehouse", "berlin", "paris", "lisbon", "item", "quantity", "discount", "coupon", "gift",
    "wrap", "priority", "note", "status", "created", "updated", "address", "street", "city",
    "zip", "country", "total", "currency", "eur", "usd", "tax", "vat", "line", "sku", "blue",
    "red", "green",
]


def payload_pool(size: int, nbytes: int, seed: int = 7) -> list[bytes]:
    """``size`` distinct JSON documents of exactly ``nbytes`` bytes (compress like real JSON)."""
    rng = random.Random(seed)
    pool = []
    for n in range(size):
        doc: dict[str, Any] = {
            "type": "order.created",
            "order_id": 100000 + n,
            "customer": rng.randrange(10**6),
            "items": [
                {"sku": f"SKU-{rng.randrange(10**5):05d}", "qty": rng.randrange(1, 9),
                 "price": round(rng.uniform(1, 500), 2)}
                for _ in range(rng.randrange(2, 6))
            ],
            "note": "",
        }
        text = json.dumps(doc, separators=(",", ":"))
        room = nbytes - len(text)
        words: list[str] = []
        while sum(len(w) + 1 for w in words) < room:
            words.append(rng.choice(_WORDS) if rng.random() < 0.8 else f"{rng.randrange(10**6)}")
        doc["note"] = " ".join(words)[: max(0, room)]
        body = json.dumps(doc, separators=(",", ":")).encode()
        pool.append(body[:nbytes] if len(body) >= nbytes else body + b" " * (nbytes - len(body)))
    return pool


#: A message's key: ``KEY_FORMAT.format(i % keys)``.
KEY_FORMAT = "key-{}"


def msg_key(i: int, keys: int = KEYS) -> str:
    return KEY_FORMAT.format(i % keys)


# --------------------------------------------------------------------------- statistics
def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..100) of an ascending sequence."""
    if not sorted_values:
        raise BenchError("no samples")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


PCTS = (50.0, 90.0, 95.0, 99.0, 99.9)


def summary(samples_ms: Sequence[float]) -> dict[str, float]:
    s = sorted(samples_ms)
    out = {f"p{q:g}": round(percentile(s, q), 3) for q in PCTS}
    out["max"] = round(s[-1], 3)
    out["mean"] = round(sum(s) / len(s), 3)
    out["n"] = len(s)
    return out


def median(values: Sequence[float]) -> float:
    s = sorted(values)
    if not s:
        raise BenchError("no runs")
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


# --------------------------------------------------------------------------- CPU accounting
_TICK = os.sysconf("SC_CLK_TCK")


def _proc_cpu(pid: int) -> float | None:
    try:
        parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(parts[11]) + int(parts[12])) / _TICK  # utime + stime


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace"
        )
    except OSError:
        return ""


def _kafka_pid() -> int | None:
    home = os.environ.get("OUTBOX_KAFKA_HOME", str(REPO / ".dev" / "kafka"))
    try:
        return int(Path(home, "kafka.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _postmaster() -> int | None:
    data = os.environ.get("OUTBOX_PG_DATA", str(REPO / ".dev" / "pg" / "data"))
    try:
        return int(Path(data, "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _reaped_children(pid: int) -> float:
    """CPU of a process' children it has waited for (cutime + cstime)."""
    try:
        parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(parts[13]) + int(parts[14])) / _TICK


class CpuSampler:
    """Cores used between ``start()`` and ``stop()`` by each part of the set-up.

    ``postgres`` counts the postmaster, its background processes, the backends of our database
    and every backend that exited meanwhile (postmaster's reaped children: pgbench's backends);
    backends of *other* databases (other people's tests on a shared box) are ``foreign``, with
    every other process on the machine. ``children`` is what this harness' exited
    subprocesses (pgbench) used. 1.0 = one core busy for the whole interval.
    """

    def __init__(self, relay_pid: int | None = None, dbname: str | None = None) -> None:
        self.relay_pid = relay_pid
        self.dbname = dbname or os.environ.get("BENCH_DBNAME", "outbox")
        self._t0 = 0.0
        self._s0: dict[str, float] = {}
        self._sys0 = (0.0, 0.0)

    @staticmethod
    def _system() -> tuple[float, float]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]
        return (sum(fields) - idle) / _TICK, sum(fields) / _TICK

    def _classify(self, pid: int, pm: int | None, kafka: int | None) -> str | None:
        if pid == self.relay_pid:
            return "relay"
        if pid == os.getpid():
            return "harness"
        if pid == kafka:
            return "kafka"
        if _comm(pid) == "postgres" or pid == pm:
            cmd = _cmdline(pid)
            words = cmd.split()
            # backends are titled "postgres: <user> <database> <client> <state>"
            if len(words) >= 4 and words[0] == "postgres:" and (
                "(" in words[3] or words[3] == "[local]"
            ):
                return "postgres" if words[2] == self.dbname else None
            return "postgres"
        return None

    def _snapshot(self) -> dict[str, float]:
        pm, kafka = _postmaster(), _kafka_pid()
        # A backend the postmaster reaps while /proc is walked would be counted twice (alive,
        # then in the reaped total) or not at all: the backend that wrote a backlog exits
        # right before a drain starts, with seconds of CPU. Walk again until no child was
        # reaped meanwhile (a zombie not reaped yet still shows its CPU in /proc).
        for _ in range(10):
            reaped = _reaped_children(pm) if pm else 0.0
            groups = self._walk(pm, kafka)
            if not pm or _reaped_children(pm) == reaped:
                break
        groups["postgres"] += reaped
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        groups["children"] = ru.ru_utime + ru.ru_stime
        return groups

    def _walk(self, pm: int | None, kafka: int | None) -> dict[str, float]:
        groups = {"postgres": 0.0, "kafka": 0.0, "relay": 0.0, "harness": 0.0}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            group = self._classify(pid, pm, kafka)
            if group is None:
                continue
            cpu = _proc_cpu(pid)
            if cpu is not None:
                groups[group] += cpu
        return groups

    def start(self) -> CpuSampler:
        self._t0 = time.monotonic()
        self._s0 = self._snapshot()
        self._sys0 = self._system()
        return self

    def stop(self) -> dict[str, float]:
        wall = max(1e-6, time.monotonic() - self._t0)
        s1 = self._snapshot()
        busy1, total1 = self._system()
        out: dict[str, float] = {"wall_s": round(wall, 3)}
        ours = 0.0
        for name, v in s1.items():
            # a process that exited meanwhile moved its CPU to its parent's reaped children,
            # which are counted for postgres (postmaster) and children (this harness)
            used = max(0.0, v - self._s0.get(name, 0.0))
            out[name] = round(used / wall, 3)
            ours += used
        busy = busy1 - self._sys0[0]
        total = total1 - self._sys0[1]
        out["machine_busy_cores"] = round(busy / wall, 3)
        out["foreign"] = round(max(0.0, busy - ours) / wall, 3)
        out["machine_busy_fraction"] = round(busy / total, 3) if total else 0.0
        return out


# --------------------------------------------------------------------------- outbox schema
@dataclass
class BenchOutbox:
    """A freshly migrated outbox in its own schema of the ``outbox`` database."""

    svc: Services
    schema: str
    shards: int
    table: str = "outbox"
    env: dict[str, str] = field(default_factory=dict)

    @property
    def t(self) -> str:
        return f'"{self.schema}"."{self.table}"'

    @classmethod
    def create(cls, svc: Services, shards: int) -> BenchOutbox:
        schema = unique("bench")
        env = {
            **os.environ,
            "OUTBOX_DATABASE_URL": svc.db_url,
            "OUTBOX_SCHEMA": schema,
            "OUTBOX_TABLE": "outbox",
            "OUTBOX_SHARDS": str(shards),
            "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": svc.bootstrap,
        }
        # with BENCH_RELAY_SRC the schema comes from the same source tree as the relay
        src = os.environ.get("BENCH_RELAY_SRC")
        cmd = [sys.executable, "-m", "outbox_relay.cli"] if src else [str(RELAY_BIN)]
        done = subprocess.run(
            [*cmd, "migrate"], env=env, capture_output=True, text=True, timeout=120,
            check=False, cwd=src or None,
        )
        if done.returncode != 0:
            raise BenchError(f"outbox-relay migrate failed: {done.stderr.strip()[-500:]}")
        box = cls(svc, schema, shards, env=env)
        box.sql(
            f'CREATE TABLE "{schema}".orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,'
            " customer int NOT NULL, amount numeric(12,2) NOT NULL, status text NOT NULL,"
            " created_at timestamptz NOT NULL DEFAULT now())"
        )
        return box

    def drop(self) -> None:
        with contextlib.suppress(Exception):
            self.sql(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')

    def sql(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        with self.svc.connect() as conn:
            cur = conn.execute(query.replace("{t}", self.t), params)
            return cur.fetchall() if cur.description else []

    def storage_of(self, names: set[str]) -> dict[str, str | None]:
        """The table's current values of these storage parameters (None: not set)."""
        rows = self.sql("SELECT unnest(reloptions) FROM pg_class WHERE oid = %s::regclass",
                        (self.t,))
        current = dict(str(r[0]).split("=", 1) for r in rows)
        return {n: current.get(n) for n in names}

    def storage(self, params: dict[str, str | None]) -> None:
        """Set storage parameters (e.g. ``fillfactor``; None resets one to Postgres's
        default); they apply to pages written next."""
        if values := [f"{k} = {v}" for k, v in params.items() if v is not None]:
            self.sql(f"ALTER TABLE {self.t} SET ({', '.join(values)})")
        if reset := [k for k, v in params.items() if v is None]:
            self.sql(f"ALTER TABLE {self.t} RESET ({', '.join(reset)})")

    def pending(self) -> int:
        return int(self.sql("SELECT count(*) FROM {t} WHERE sent_at IS NULL")[0][0])

    def any_pending(self) -> bool:
        return bool(
            self.sql(
                "SELECT EXISTS (SELECT 1 FROM {t} WHERE sent_at IS NULL AND dead_at IS NULL)"
            )[0][0]
        )

    @property
    def stats(self) -> str:
        """The delivery counters the relay writes with every mark (rows deleted or kept)."""
        return f'"{self.schema}"."{self.table}_sent_stats"'

    def sent_span(self) -> tuple[Any, Any, int]:
        """First and last delivery the relay recorded, and the rows delivered in all."""
        first, last, sent = self.sql(
            f"SELECT min(first_at), max(last_at), coalesce(sum(sent), 0) FROM {self.stats}"
        )[0]
        return first, last, int(sent)

    def truncate(self) -> None:
        self.sql(f'TRUNCATE {self.t}, "{self.schema}".orders, {self.stats}')

    def checkpoint(self) -> None:
        self.sql("CHECKPOINT")

    def wait_drained(
        self, relay: RelayProcess, timeout: float, every: float = 0.1, sent: int | None = None
    ) -> float:
        """Wait until nothing is pending (or, given ``sent``, until the relay's counters say
        that many rows were delivered: a cheap query, where looking for pending rows walks
        the dead entries of every deleted row); returns the time waited."""
        t0 = time.monotonic()
        while (self.sent_span()[2] < sent) if sent is not None else self.any_pending():
            relay.check_alive()
            if time.monotonic() - t0 > timeout:
                raise BenchError(
                    f"relay did not drain {self.t} within {timeout:.0f}s "
                    f"({self.pending()} pending); log: {relay.log_path}"
                )
            time.sleep(every)
        return time.monotonic() - t0

    def drop_trigger(self) -> None:
        self.sql(f'DROP TRIGGER IF EXISTS "{self.table}_notify" ON {self.t}')

    def create_trigger(self) -> None:
        self.sql(
            f'CREATE TRIGGER "{self.table}_notify" AFTER INSERT ON {self.t} FOR EACH STATEMENT'
            f' EXECUTE FUNCTION "{self.schema}"."{self.table}_notify"()'
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def relay_stats(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Batches, rows per batch, ms per batch, NOTIFY wake-ups between two scrapes."""

    def d(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    count = d("outbox_batch_size_count")
    out = {"batches": count}
    if count:
        out["mean_batch_rows"] = round(d("outbox_batch_size_sum") / count, 1)
        out["mean_batch_ms"] = round(1000 * d("outbox_batch_duration_seconds_sum") / count, 2)
    out["notify_wakeups"] = d("outbox_notifications_total")
    out["polls_with_work"] = d("outbox_polls_with_work_total")
    return out


# --------------------------------------------------------------------------- the relay
_COMPILED: set[str] = set()


def compile_bytecode(tree: str | Path) -> None:
    """Write the bytecode of ``tree``'s ``outbox_relay`` package once per run, as an installed
    relay has it (pip and the Docker image compile at install). Without it a relay started
    from a source tree where ``PYTHONDONTWRITEBYTECODE`` is set (this machine's environment)
    compiles its modules again at every start, ~0.15 s of its start-up."""
    pkg = Path(tree) / "outbox_relay"
    if str(pkg) in _COMPILED or not pkg.is_dir():
        return
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(pkg)],
        check=True, capture_output=True, timeout=120,
    )
    _COMPILED.add(str(pkg))


class RelayProcess:
    """``outbox-relay run`` as a real subprocess (or, with ``BENCH_RELAY_SRC``, the relay of
    another source tree, e.g. a scratch copy with a proposed change)."""

    def __init__(
        self,
        box: BenchOutbox,
        log_path: Path,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        wrap: Sequence[str] = (),
        src: str | None = None,
    ) -> None:
        self.box = box
        self.log_path = log_path
        self.http_port = free_port()
        full = {
            **box.env,
            "OUTBOX_HTTP_PORT": str(self.http_port),
            "OUTBOX_HTTP_HOST": "127.0.0.1",
            "OUTBOX_RELAY_NAME": f"bench-{uuid.uuid4().hex[:6]}",
            "OUTBOX_LOG_LEVEL": "INFO",
            **(env or {}),
        }
        if src is None:  # "" = the installed tree, whatever BENCH_RELAY_SRC says
            src = os.environ.get("BENCH_RELAY_SRC")
        compile_bytecode(src or REPO)
        if src:
            full["PYTHONPATH"] = src + os.pathsep + full.get("PYTHONPATH", "")
        if wrap or src:
            cmd = [sys.executable, *wrap, "-m", "outbox_relay.cli", "run", *args]
        else:
            cmd = [str(RELAY_BIN), "run", *args]
        self._fh = log_path.open("ab")
        self.started_wall = time.time()
        self.started = time.monotonic()
        # with another source tree, run from it: `python -m` puts the cwd first on sys.path
        self.proc = subprocess.Popen(
            cmd, env=full, stdout=self._fh, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=src or None,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-1500:]
            raise BenchError(f"relay exited with {self.proc.returncode}:\n{tail}")

    def wait_ready(self, timeout: float = 30) -> float:
        """Wait until the relay owns every shard; returns spawn → ready seconds (wall clock of
        the last ``acquired_at`` the relay wrote, so the polling interval does not count)."""
        q = (
            f'SELECT count(*), max(acquired_at) FROM "{self.box.schema}".'
            f'"{self.box.table}_shards" WHERE acquired_at >= to_timestamp(%s)'
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            n, last = self.box.sql(q, (self.started_wall,))[0]
            if n == self.box.shards:
                return float(last.timestamp() - self.started_wall)
            time.sleep(0.02)
        raise BenchError(f"relay not ready within {timeout}s; log: {self.log_path}")

    def metrics(self) -> dict[str, float]:
        """The relay's own Prometheus counters (unlabelled series only)."""
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.http_port}/metrics", timeout=5
        ) as resp:
            text = resp.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or " " not in line:
                continue
            name, value = line.rsplit(" ", 1)
            if "{" not in name:
                out[name] = float(value)
        return out

    def vmhwm_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
        raise BenchError("VmHWM not found")

    def cpu_s(self) -> float:
        return _proc_cpu(self.pid) or 0.0

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)
        finally:
            self._fh.close()
