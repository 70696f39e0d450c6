"""The webhook sink: unit tests of its parts, then the relay as a real subprocess delivering to a
real HTTP server on loopback (``webhook_receiver``), with real Postgres (and Kafka for routes).
"""

from __future__ import annotations

import base64
import email.utils
import json
import os
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import Engine
from sqlalchemy.orm import Session
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from outbox_relay import Message, enqueue_many
from outbox_relay.errors import ConfigError
from outbox_relay.routes import Route, Routes, load_routes
from outbox_relay.settings import load_settings
from outbox_relay.sinks.base import Outcome
from outbox_relay.sinks.router import RouterSink
from outbox_relay.sinks.webhook import (
    CircuitBreaker,
    Signer,
    WebhookSink,
    address_problem,
    decode_secret,
    endpoint_config,
    parse_retry_after,
)
from outbox_relay.store import OutboxRow

from .conftest import Outbox, RelayProcess, consume, run_cli, wait_for
from .webhook_receiver import Hit, Receiver, Reply, fail_first


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def _row(i: int, key: str | None = None, topic: str = "t", payload: bytes = b'{"n": 1}',
         headers: dict[str, str] | None = None) -> OutboxRow:
    return OutboxRow(i, f"ik-{i}", topic, key, payload, "application/json",
                     json.dumps(headers) if headers else None, 0, 0, time.time())


def _sink(url: str, secret: str, **kw: Any) -> WebhookSink:
    opts = {k: kw.pop(k) for k in ("breaker_failures", "breaker_cooldown", "resolver")
            if k in kw}
    cfg = endpoint_config("default", url, [SecretStr(secret)], where="test", **kw)
    return WebhookSink([cfg], allow_private=True, **opts)


# ================================================================================== unit tests
def test_signature_known_vector() -> None:
    # the example of the Standard Webhooks specification
    signer = Signer([SecretStr("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")])
    sig = signer.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
    assert sig == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_signature_rotation_and_the_reference_library() -> None:
    a, b = new_secret(), new_secret()
    signer = Signer([SecretStr(a), SecretStr(b)])
    ts = int(time.time())
    body = b'{"hello": "world"}'
    header = signer.sign("msg_1", ts, body)
    assert len(header.split(" ")) == 2 and all(p.startswith("v1,") for p in header.split(" "))
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(ts), "webhook-signature": header}
    for secret in (a, b):
        assert Webhook(secret).verify(body, headers) == {"hello": "world"}
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)
    assert a not in repr(signer) and "2 secret" in repr(signer)


@pytest.mark.parametrize("bad", ["whsec_", "whsec_s3cr3t value!", "whsec_Zm9vY", "s3cr3t%%"])
def test_bad_secret_error_does_not_echo_it(bad: str) -> None:
    with pytest.raises(ValueError, match="secret") as err:
        decode_secret(bad)
    assert "s3cr3t" not in str(err.value) and "Zm9vY" not in str(err.value)


def test_secret_padding_is_optional() -> None:
    raw = os.urandom(20)
    text = base64.b64encode(raw).decode()
    assert decode_secret("whsec_" + text.rstrip("=")) == raw == decode_secret(text)


NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2", 2.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("-3", 0.0),
        (email.utils.formatdate(NOW + 30, usegmt=True), 30.0),
        (email.utils.formatdate(NOW - 30, usegmt=True), 0.0),
        ("Tue, 14 Nov 2023 22:14:20 GMT", 1_700_000_060.0 - NOW),
        ("soon", None),
        ("", None),
        (None, None),
        ("nan", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    got = parse_retry_after(value, now=NOW)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected, abs=0.001)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_circuit_breaker_opens_probes_and_recovers() -> None:
    clock = Clock()
    changes: list[str] = []
    br = CircuitBreaker(3, cooldown=10, max_cooldown=35, clock=clock,
                        on_change=lambda s, _why: changes.append(s))
    for n in range(2):
        assert br.admit().kind == "allow"
        br.failure("HTTP 500", message=f"m{n}")
    assert br.state == "closed"
    br.failure("HTTP 500", message="m2")
    assert br.state == "open"
    adm = br.admit()
    assert adm.kind == "reject" and adm.retry_after == pytest.approx(10)
    clock.t += 4
    assert br.admit().retry_after == pytest.approx(6)
    clock.t += 6
    assert br.admit().kind == "probe"
    assert br.admit().kind == "wait", "one probe at a time"
    br.failure("timeout", probe=True, message="m3")
    assert br.admit().retry_after == pytest.approx(20), "cool-down doubles after a failed probe"
    clock.t += 20
    assert br.admit().kind == "probe"
    br.failure("timeout", probe=True, message="m4")
    assert br.admit().retry_after == pytest.approx(35), "capped"
    clock.t += 35
    assert br.admit().kind == "probe"
    br.success()
    assert br.state == "closed" and br.admit().kind == "allow"
    assert changes == ["open", "half-open", "open", "half-open", "open", "half-open", "closed"]
    # after recovery the cool-down starts from the base again
    for n in range(3):
        br.failure("x", message=f"n{n}")
    assert br.admit().retry_after == pytest.approx(10)


def test_circuit_breaker_one_poison_message_does_not_open_it() -> None:
    br = CircuitBreaker(3, cooldown=10, clock=Clock())
    for _ in range(10):
        br.failure("HTTP 500", message="poison")
    assert br.state == "closed"
    br.failure("HTTP 500", message="other")
    br.failure("HTTP 500", message="third")
    assert br.state == "open"


def test_circuit_breaker_retry_after_pause_and_wait_for_probe() -> None:
    clock = Clock()
    br = CircuitBreaker(5, cooldown=10, max_cooldown=60, clock=clock)
    br.failure("HTTP 429", pause=2.5, message="m")
    assert br.admit() == ("reject", pytest.approx(2.5))
    br.failure("HTTP 429", pause=1000, message="m")
    assert br.admit().retry_after == pytest.approx(60), "a pause is capped too"
    clock.t += 60
    assert br.admit().kind == "probe"
    done = threading.Event()

    def waiter() -> None:
        br.wait_probe(5)
        done.set()

    threading.Thread(target=waiter).start()
    assert not done.wait(0.1)
    br.success()
    assert done.wait(2)


@pytest.mark.parametrize(
    ("ip", "allow_private", "problem"),
    [
        ("127.0.0.1", False, "loopback"),
        ("::1", False, "loopback"),
        ("10.1.2.3", False, "private"),
        ("192.168.0.10", False, "private"),
        ("172.16.5.5", False, "private"),
        ("169.254.10.10", False, "link-local"),
        ("fe80::1", False, "link-local"),
        ("fd12:3456::1", False, "private"),
        ("100.64.0.1", False, "not a public"),
        ("::ffff:127.0.0.1", False, "loopback"),
        ("0.0.0.0", True, "unicast"),
        ("169.254.169.254", True, "metadata"),
        ("fd00:ec2::254", True, "metadata"),
        ("127.0.0.1", True, None),
        ("10.1.2.3", True, None),
        ("93.184.216.34", False, None),
        ("2606:4700::1111", False, None),
    ],
)
def test_ssrf_address_classes(ip: str, allow_private: bool, problem: str | None) -> None:
    import ipaddress

    got = address_problem(ipaddress.ip_address(ip), allow_private)
    assert (got is None) if problem is None else (got is not None and problem in got)


def test_ssrf_guard_checks_the_address_it_connects_to(receiver: Receiver) -> None:
    """DNS rebinding: the start-up check sees a public address, the connection would go to
    loopback: the guard resolves at connect time and refuses, no request is made."""
    answers = ["93.184.216.34"]

    def resolver(host: str, port: int) -> list[Any]:
        import ipaddress

        assert host == "hooks.example.test"
        return [ipaddress.ip_address(answers[-1])]

    cfg = endpoint_config("default", f"http://hooks.example.test:{receiver.port}/h",
                          [SecretStr(new_secret())], where="test")
    sink = WebhookSink([cfg], allow_private=False, resolver=resolver)
    try:
        sink.check()  # public: fine
        answers.append("127.0.0.1")
        with pytest.raises(ConfigError, match="loopback"):
            sink.check()
        [outcome] = sink.publish([_row(1)], 5)
        assert outcome.failed and "refused by the SSRF guard" in (outcome.error or "")
        assert receiver.snapshot() == []
    finally:
        sink.close(1)


def test_sink_per_key_chains_headers_and_body_cap(receiver: Receiver) -> None:
    secret = new_secret()

    def rule(hit: Hit) -> Reply:
        if hit.id == "ik-1":
            return Reply(500, body=b"x" * 100_000)
        return Reply(200, body=b"y" * 100_000)

    receiver.rule = rule
    sink = _sink(receiver.url(), secret, headers={"X-Tenant": "acme", "Authorization": "Bearer t"})
    try:
        rows = [
            _row(1, "a"), _row(2, "a"), _row(3, "b", headers={"Trace": "t-3", "X-Tenant": "evil",
                                                              "Webhook-Id": "spoof"}),
            _row(4, "a"), _row(5, "b"), _row(6, None, topic="tøpic"),
        ]
        out = sink.publish(rows, 10)
        assert out[0].failed and "HTTP 500 Internal Server Error: xxx" in (out[0].error or "")
        assert len(out[0].error or "") < 500, "response body quoted up to a small cap"
        assert out[1] == Outcome.skip() and out[3] == Outcome.skip()
        assert [o.delivered for o in (out[2], out[4], out[5])] == [True, True, True]
        assert sorted(h.id for h in receiver.snapshot()) == ["ik-1", "ik-3", "ik-5", "ik-6"]
        h3 = receiver.of("ik-3")[0]
        assert h3.headers["trace"] == "t-3"
        assert h3.headers["x-tenant"] == "acme", "the endpoint's headers win over a row's"
        assert h3.headers["webhook-id"] == "ik-3" == h3.headers["idempotency-key"]
        assert h3.headers["outbox-id"] == "3" and h3.headers["outbox-key"] == "b"
        assert h3.headers["authorization"] == "Bearer t"
        assert h3.headers["content-type"] == "application/json"
        Webhook(secret).verify(h3.body, h3.headers)
        assert receiver.of("ik-6")[0].headers["outbox-topic"] == "t%C3%B8pic"
    finally:
        sink.close(1)


def test_sink_does_not_follow_redirects_and_hides_url_path(receiver: Receiver) -> None:
    secret = new_secret()
    receiver.rule = lambda h: Reply(302, {"Location": receiver.url("/elsewhere")},
                                    f"moved; your secret is {secret}".encode())
    sink = _sink(receiver.url("/hooks/tok-123"), secret)
    try:
        [out] = sink.publish([_row(1)], 10)
        assert out.failed and "redirects are not followed" in (out.error or "")
        assert secret not in (out.error or "") and "tok-123" not in (out.error or "")
        assert len(receiver.snapshot()) == 1 and receiver.snapshot()[0].path == "/hooks/tok-123"
    finally:
        sink.close(1)


def test_tls_certificates_are_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ssl
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server = Receiver(ssl_context=ctx)
    secret = new_secret()
    try:
        sink = _sink(server.url(), secret)
        [out] = sink.publish([_row(1)], 10)
        sink.close(1)
        assert out.failed and "CERTIFICATE_VERIFY_FAILED" in (out.error or ""), out
        assert server.snapshot() == []
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # a private CA, the documented way
        sink = _sink(server.url(), secret)
        [out] = sink.publish([_row(2)], 10)
        sink.close(1)
        assert out.delivered, out
        Webhook(secret).verify(server.snapshot()[0].body, server.snapshot()[0].headers)
    finally:
        server.close()


def test_router_splits_by_route_and_keeps_key_order() -> None:
    class Fake:
        name = "fake"

        def __init__(self, fail: set[int] | None = None) -> None:
            self.got: list[tuple[int, str, str | None]] = []
            self.fail = fail or set()

        def publish(self, rows: list[OutboxRow], timeout: float) -> list[Outcome]:
            self.got += [(r.id, r.topic, None) for r in rows]
            return [Outcome.fail("no") if r.id in self.fail else Outcome.ok() for r in rows]

        def publish_to(self, rows: list[OutboxRow], names: list[str], timeout: float
                       ) -> list[Outcome]:
            self.got += [(r.id, r.topic, n) for r, n in zip(rows, names, strict=True)]
            return [Outcome.ok() for _ in rows]

        def check(self) -> None: ...

        def close(self, timeout: float) -> None: ...

    routes = Routes(Path("routes.toml"), (
        Route(1, ("audit.*",), kafka_topic="audit-all"),
        Route(2, ("hook.*", "web.*"), webhook="a"),
        Route(3, ("k.*",)),
    ), {})
    kafka, hooks = Fake(fail={3}), Fake()
    router = RouterSink(routes, kafka, hooks)  # type: ignore[arg-type]
    rows = [
        _row(1, "x", "k.one"), _row(2, "x", "hook.one"),  # x switches destination: held
        _row(3, "y", "k.two"), _row(4, "z", "nowhere"), _row(5, "z", "k.three"),
        _row(6, None, "web.x"), _row(7, "w", "audit.login"), _row(8, "x", "k.four"),
    ]
    out = router.publish(rows, 5)
    assert out[0].delivered and out[1] == Outcome.skip() and out[7] == Outcome.skip()
    assert out[2].failed  # the Kafka sink's own outcome, in its place
    assert out[3].failed and "no route" in (out[3].error or "") and "'nowhere'" in out[3].error
    assert out[4] == Outcome.skip(), "a key waits behind its unrouted row"
    assert out[5].delivered and out[6].delivered
    assert kafka.got == [(1, "k.one", None), (3, "k.two", None), (7, "audit-all", None)]
    assert hooks.got == [(6, "web.x", "a")]
    assert routes.match("web.q") is routes.routes[1] and routes.match("zzz") is None


ROUTES_OK = """
[[route]]
topics = ["orders.*", "invoices.*"]
webhook = "billing"

[[route]]
topic = "*"
kafka = true

[webhook.billing]
url = "https://billing.example.com/hooks/abc"
secrets = ["{s1}"]
secrets_env = "TEST_ROUTES_SECRET"
timeout = 3
concurrency = 4
headers = {{ "X-Tenant" = "acme" }}
"""


def test_routes_file_parses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s1, s2 = new_secret(), new_secret()
    monkeypatch.setenv("TEST_ROUTES_SECRET", s2)
    path = tmp_path / "routes.toml"
    path.write_text(ROUTES_OK.format(s1=s1))
    routes = load_routes(path, load_settings())
    hook = routes.webhooks["billing"]
    assert [s.get_secret_value() for s in hook.secrets] == [s1, s2]
    assert hook.timeout == 3 and hook.concurrency == 4 and hook.headers == {"x-tenant": "acme"}
    assert routes.match("orders.created").webhook == "billing"  # type: ignore[union-attr]
    assert routes.match("anything").kafka  # type: ignore[union-attr]
    assert s1 not in repr(routes) and s2 not in repr(routes)


BAD_ROUTES = [
    ("[[route]\n", "invalid TOML"),
    ('[[route]]\ntopics = "a"\nwebhook = "nope"\n', "route #1: unknown webhook 'nope'"),
    ('[[route]]\ntopics = "a"\n', "exactly one of"),
    ('[[route]]\ntopics = "a"\nkafka = true\nwebhook = "x"\n', "exactly one of"),
    ('[[route]]\nkafka = true\n', "no 'topics'"),
    ('[[route]]\ntopics = []\nkafka = true\n', "'topics' must be"),
    ('[[route]]\ntopics = "a"\nkafka = "bad topic!"\n', "'kafka' must be"),
    ('[[route]]\ntopics = "a"\nkafak = true\n', "unknown key 'kafak'"),
    ('[webhook.x]\nurl = "https://x.example"\nsecrets = ["{s}"]\n', "no [[route]]"),
    ('[[route]]\ntopics = "a"\nwebhook = "x"\n[webhook.x]\nurl = "ftp://x.example"\n'
     'secrets = ["{s}"]\n', "only http:// and https://"),
    ('[[route]]\ntopics = "a"\nwebhook = "x"\n[webhook.x]\nurl = "https://x.example"\n'
     'secrets_env = "NOPE_NOT_SET_SECRET"\n', "environment variable NOPE_NOT_SET_SECRET"),
    ('[[route]]\ntopics = "a"\nwebhook = "x"\n[webhook.x]\nurl = "https://x.example"\n',
     "no signing secret"),
    ('[[route]]\ntopics = "a"\nwebhook = "x"\n[webhook.x]\nurl = "https://x.example"\n'
     'secrets = ["whsec_!!!"]\n', "not a Standard Webhooks secret"),
    ('[[route]]\ntopics = "a"\nwebhook = "x"\n[webhook.x]\nurl = "https://x.example"\n'
     'secrets = ["{s}"]\ntimeout = 0\n', "timeout must be"),
    ('[[route]]\ntopics = "a"\nwebhook = "x"\n[webhook.x]\nurl = "https://x.example"\n'
     'secrets = ["{s}"]\nheaders = {{ "Webhook-Signature" = "x" }}\n', "set by the relay"),
    ('[[route]]\ntopics = "a"\nwebhook = "x"\n[webhook.x]\nurl = "https://x.example"\n'
     'secret = "{s}"\n', "unknown key 'secret'"),
]


@pytest.mark.parametrize(("text", "needle"), BAD_ROUTES)
def test_bad_routes_file_is_one_clear_error(tmp_path: Path, text: str, needle: str) -> None:
    secret = new_secret()
    path = tmp_path / "routes.toml"
    path.write_text(text.replace("{s}", secret).replace("{{", "{").replace("}}", "}"))
    with pytest.raises(ConfigError) as err:
        load_routes(path, load_settings())
    msg = str(err.value)
    assert needle in msg and str(path) in msg and "\n" not in msg
    assert secret not in msg and secret.removeprefix("whsec_") not in msg


# ================================================================================== the relay
def _start(relay_factory: Callable[..., RelayProcess], receiver: Receiver, secret: str,
           **env: str) -> RelayProcess:
    full = {"OUTBOX_SINK": "webhook", "OUTBOX_WEBHOOK_URL": receiver.url(),
            "OUTBOX_WEBHOOK_SECRET": secret, "OUTBOX_WEBHOOK_ALLOW_PRIVATE": "true", **env}
    return relay_factory(**full)


def _enqueue(engine: Engine, msgs: list[Message]) -> None:
    with Session(engine) as s, s.begin():
        enqueue_many(s, msgs)


def _msgs(prefix: str, n: int, key: Callable[[int], str | None] | None = None,
          topic: str = "orders.created", start: int = 0) -> list[Message]:
    return [Message(topic, {"n": i, "p": prefix}, key=(key(i) if key else f"{prefix}-k{i}"),
                    idempotency_key=f"{prefix}-{i}") for i in range(start, start + n)]


def _metrics(relay: RelayProcess) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{relay.http_port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def test_delivers_signed_messages_with_secret_rotation(
    outbox: Outbox, engine: Engine, receiver: Receiver,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    old, new = new_secret(), new_secret()
    relay = _start(relay_factory, receiver, f"{old} {new}", OUTBOX_KEEP_SENT="true")
    _enqueue(engine, [
        Message("orders.created", {"order": 1}, key="c-1", idempotency_key="ik-1",
                headers={"traceparent": "00-abc-01", "Webhook-Id": "spoofed"}),
        Message("orders.note", "hello", idempotency_key="ik-2"),
        Message("blobs", b"\x01\x02", content_type="application/x-thing", idempotency_key="ik-3"),
    ])
    receiver.wait(lambda r: len(r.delivered()) == 3, 30, "three deliveries")
    ids = dict(outbox.sql("SELECT idempotency_key, id FROM {t}"))
    for hit in receiver.delivered():
        for secret in (old, new):  # rotation: a receiver with either secret accepts it
            Webhook(secret).verify(hit.body, hit.headers, json_parse=False)
        with pytest.raises(WebhookVerificationError):
            Webhook(new_secret()).verify(hit.body, hit.headers, json_parse=False)
        with pytest.raises(WebhookVerificationError):
            Webhook(old).verify(hit.body + b" ", hit.headers, json_parse=False)
        assert hit.headers["webhook-id"] == hit.headers["idempotency-key"]
        assert hit.headers["outbox-id"] == str(ids[hit.id])
        assert abs(int(hit.headers["webhook-timestamp"]) - time.time()) < 60
        assert len(hit.headers["webhook-signature"].split(" ")) == 2
    by_id = {h.id: h for h in receiver.delivered()}
    assert json.loads(by_id["ik-1"].body) == {"order": 1}
    assert by_id["ik-1"].headers["content-type"] == "application/json"
    assert by_id["ik-1"].headers["traceparent"] == "00-abc-01"
    assert by_id["ik-1"].headers["outbox-topic"] == "orders.created"
    assert by_id["ik-1"].headers["outbox-key"] == "c-1"
    assert by_id["ik-2"].headers["content-type"].startswith("text/plain")
    assert by_id["ik-3"].body == b"\x01\x02"
    assert by_id["ik-3"].headers["content-type"] == "application/x-thing"
    wait_for(lambda: outbox.pending() == 0, 10, "rows marked sent")
    assert relay.terminate() == 0


def test_500_then_200_one_delivery_same_id_growing_spacing(
    outbox: Outbox, engine: Engine, receiver: Receiver,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    receiver.rule = fail_first(3, 500, b'{"error": "boom"}')
    _start(relay_factory, receiver, new_secret(), OUTBOX_RETRY_BACKOFF_BASE="0.3",
           OUTBOX_POLL_INTERVAL="0.1", OUTBOX_WEBHOOK_BREAKER_FAILURES="1000",
           OUTBOX_MAX_ATTEMPTS="20", OUTBOX_KEEP_SENT="true")
    n = 20
    _enqueue(engine, _msgs("m", n))
    receiver.wait(lambda r: len(r.delivered()) == n, 90, "every message delivered")
    wait_for(lambda: outbox.pending() == 0, 10, "rows marked sent")
    time.sleep(0.5)
    first_gaps, last_gaps = [], []
    for i in range(n):
        hits = receiver.of(f"m-{i}")
        assert [h.status for h in hits] == [500, 500, 500, 200], "one delivery, after 3 failures"
        stamps = [int(h.headers["webhook-timestamp"]) for h in hits]
        assert stamps == sorted(stamps)
        # from the second retry on: the first retry's gap also holds the relay's first round
        # and the receiver's first answers, ~1 s more than the backoff on a loaded machine
        first_gaps.append(hits[2].at - hits[1].at)
        last_gaps.append(hits[3].at - hits[2].at)
    rows = outbox.sql("SELECT attempts, last_error, sent_at FROM {t}")
    assert all(a == 3 and "HTTP 500" in e and "boom" in e and s is not None for a, e, s in rows)
    # full jitter: each gap is random in [0, base * 2^attempt]; on average they grow
    assert sum(last_gaps) / n > sum(first_gaps) / n


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_respected(
    outbox: Outbox, engine: Engine, receiver: Receiver,
    relay_factory: Callable[..., RelayProcess], status: int,
) -> None:
    def retry_after() -> str:  # 429: delay-seconds, 503: an HTTP date
        return "2" if status == 429 else email.utils.formatdate(time.time() + 3, usegmt=True)

    receiver.rule = lambda h: (Reply(status, {"Retry-After": retry_after()}, b"slow down")
                               if h.attempt == 1 else Reply())
    _start(relay_factory, receiver, new_secret(), OUTBOX_POLL_INTERVAL="0.1",
           OUTBOX_RETRY_BACKOFF_BASE="0.05", OUTBOX_KEEP_SENT="true")
    _enqueue(engine, _msgs("r", 3))
    receiver.wait(lambda r: len(r.delivered()) == 3, 30, "deliveries after Retry-After")
    hits = receiver.snapshot()
    first = min(h.at for h in hits)
    retries = [h for h in hits if h.attempt > 1]
    assert retries and all(h.at - first >= 2.0 for h in retries), [h.at - first for h in hits]
    wait_for(lambda: outbox.pending() == 0, 10, "marked sent")
    errors = [e for (e,) in outbox.sql("SELECT last_error FROM {t}")]
    assert len(errors) == 3
    assert all(f"HTTP {status}" in e and "Retry-After" in e for e in errors), errors


def test_410_disables_the_endpoint_and_rows_stay_pending(
    outbox: Outbox, engine: Engine, receiver: Receiver,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    receiver.rule = lambda h: Reply(410, body=b"this endpoint was deleted")
    relay = _start(relay_factory, receiver, new_secret(), OUTBOX_WEBHOOK_CONCURRENCY="1")
    _enqueue(engine, _msgs("g", 5))
    wait_for(lambda: "WEBHOOK ENDPOINT DISABLED" in relay.output(), 20, "the loud log line")
    _enqueue(engine, _msgs("g", 3, start=5))
    wait_for(lambda: outbox.sql("SELECT count(*) FROM {t} WHERE last_error LIKE '%disabled%'")
             [0][0] == 8, 20, "every row held back")
    assert len(receiver.snapshot()) == 1, "no request after the 410"
    assert outbox.pending() == 8
    assert outbox.sql("SELECT count(*) FROM {t} WHERE dead_at IS NOT NULL")[0][0] == 0
    assert 'outbox_webhook_endpoint_state{endpoint="default"} 3.0' in _metrics(relay)
    assert "410 Gone" in relay.output()
    # held back, not failing: attempts do not grow, so the rows never become dead letters
    attempts = outbox.sql("SELECT max(attempts) FROM {t}")[0][0]
    assert attempts <= 1
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{relay.http_port}/readyz", timeout=5)
        raise AssertionError("ready while its only endpoint is disabled")
    except urllib.error.HTTPError as exc:
        assert exc.code == 503
        detail = json.dumps(json.load(exc)["sink_detail"])
    assert "disabled" in detail
    assert relay.terminate() == 0


def test_per_key_order_with_a_flaky_endpoint_other_keys_keep_flowing(
    outbox: Outbox, engine: Engine, receiver: Receiver,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    blocked = threading.Event()
    blocked.set()
    receiver.rule = lambda h: (Reply(500, body=b"not now") if h.id == "a-0" and blocked.is_set()
                               else Reply())
    _start(relay_factory, receiver, new_secret(), OUTBOX_RETRY_BACKOFF_BASE="0.1",
           OUTBOX_RETRY_BACKOFF_MAX="0.5", OUTBOX_MAX_ATTEMPTS="1000", OUTBOX_POLL_INTERVAL="0.2")
    keys = "abcde"
    _enqueue(engine, [Message("orders", {"k": k, "n": n}, key=k, idempotency_key=f"{k}-{n}")
                      for n in range(5) for k in keys])
    receiver.wait(lambda r: len(r.of("a-0")) >= 2 and len(r.delivered()) == 20, 30,
                  "keys b..e delivered while a-0 fails")
    _enqueue(engine, [Message("orders", {"k": k, "n": n}, key=k, idempotency_key=f"{k}-{n}")
                      for n in range(5, 8) for k in "bcde"])
    failures_before = len(receiver.of("a-0"))
    receiver.wait(lambda r: len(r.delivered()) == 32 and len(r.of("a-0")) > failures_before + 1,
                  30, "more of b..e delivered while key a is still blocked")
    assert not [h for h in receiver.snapshot() if h.id.startswith("a-") and h.id != "a-0"]
    blocked.clear()
    receiver.wait(lambda r: len(r.delivered()) == 37, 30, "key a after the endpoint recovered")
    delivered = receiver.delivered_ids()
    assert len(delivered) == len(set(delivered)) == 37
    for k in keys:
        seq = [int(i.split("-")[1]) for i in delivered if i.startswith(f"{k}-")]
        assert seq == sorted(seq), f"key {k} out of order: {seq}"
    wait_for(lambda: outbox.pending() == 0, 10, "all marked sent")


def test_dead_letter_after_max_attempts_then_retry_from_cli(
    outbox: Outbox, engine: Engine, receiver: Receiver,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    broken = threading.Event()
    broken.set()
    receiver.rule = lambda h: (Reply(500, body=b"still broken") if h.id == "doomed"
                               and broken.is_set() else Reply())
    _start(relay_factory, receiver, new_secret(), OUTBOX_MAX_ATTEMPTS="3",
           OUTBOX_RETRY_BACKOFF_BASE="0.05", OUTBOX_POLL_INTERVAL="0.2")
    _enqueue(engine, [Message("orders", {"n": 0}, key="k", idempotency_key="doomed"),
                      Message("orders", {"n": 1}, key="k", idempotency_key="after"),
                      Message("orders", {"n": 2}, key="j", idempotency_key="other")])
    wait_for(lambda: outbox.sql("SELECT dead_at IS NOT NULL FROM {t} "
                                "WHERE idempotency_key = 'doomed'")[0][0], 30, "a dead letter")
    receiver.wait(lambda r: sorted(r.delivered_ids()) == ["after", "other"], 20,
                  "the rest delivered")
    attempts, error = outbox.sql("SELECT attempts, last_error FROM {t} "
                                 "WHERE idempotency_key = 'doomed'")[0]
    assert attempts == 3 and "HTTP 500" in error and "still broken" in error
    doomed = receiver.of("doomed")
    assert len(doomed) == 3 and {h.id for h in doomed} == {"doomed"}
    assert receiver.of("after")[0].at > doomed[-1].at, "the key waited for its dead letter"
    listed = run_cli("dead-letters", "list", "--json", env=outbox.env)
    assert listed.returncode == 0 and "doomed" in listed.stdout
    broken.clear()
    row_id = outbox.sql("SELECT id FROM {t} WHERE idempotency_key = 'doomed'")[0][0]
    retried = run_cli("dead-letters", "retry", "--id", str(row_id), env=outbox.env)
    assert retried.returncode == 0 and "re-queued 1" in retried.stdout
    receiver.wait(lambda r: "doomed" in r.delivered_ids(), 20, "the retried dead letter")
    wait_for(lambda: outbox.pending() == 0, 10, "all marked sent")


def test_timeout_then_delivery(
    outbox: Outbox, engine: Engine, receiver: Receiver,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    receiver.rule = lambda h: Reply(delay=3) if h.attempt == 1 else Reply()
    _start(relay_factory, receiver, new_secret(), OUTBOX_WEBHOOK_TIMEOUT="1",
           OUTBOX_RETRY_BACKOFF_BASE="0.1", OUTBOX_POLL_INTERVAL="0.2", OUTBOX_KEEP_SENT="true")
    _enqueue(engine, _msgs("t", 1))
    receiver.wait(lambda r: r.delivered_ids() == ["t-0"], 30, "delivery after a timeout")
    hits = receiver.of("t-0")
    assert len(hits) == 2
    wait_for(lambda: outbox.pending() == 0, 10, "marked sent")
    attempts, error = outbox.sql("SELECT attempts, last_error FROM {t}")[0]
    assert attempts == 1 and "timed out after 1s" in error


def test_circuit_breaker_outage_then_recovery_loses_nothing(
    outbox: Outbox, engine: Engine, receiver: Receiver,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    down = threading.Event()
    down.set()
    receiver.rule = lambda h: Reply(500, body=b"down") if down.is_set() else Reply()
    relay = _start(relay_factory, receiver, new_secret(), OUTBOX_WEBHOOK_BREAKER_FAILURES="3",
                   OUTBOX_WEBHOOK_BREAKER_COOLDOWN="0.5", OUTBOX_WEBHOOK_CONCURRENCY="4",
                   OUTBOX_MAX_ATTEMPTS="1000", OUTBOX_RETRY_BACKOFF_BASE="0.1",
                   OUTBOX_RETRY_BACKOFF_MAX="2", OUTBOX_POLL_INTERVAL="0.2")
    n = 40
    _enqueue(engine, _msgs("c", n))
    wait_for(lambda: outbox.sql("SELECT count(*) FROM {t} WHERE last_error LIKE "
                                "'%circuit open%'")[0][0] >= n // 2, 20,
             "rows held back by the open circuit")
    wait_for(lambda: "circuit half-open" in relay.output(), 10, "a probe")
    during = len(receiver.snapshot())
    assert during < n, "the breaker kept the relay from trying every message"
    down.clear()
    receiver.wait(lambda r: len(r.delivered()) == n, 60, "everything after recovery")
    wait_for(lambda: outbox.pending() == 0, 10, "all marked sent")
    assert sorted(receiver.delivered_ids()) == sorted(f"c-{i}" for i in range(n))
    assert "circuit opened" in relay.output() and "circuit closed" in relay.output()


ROUTES_TWO_HOOKS = """
[[route]]
topics = "slow.*"
webhook = "slow"

[[route]]
topics = "fast.*"
webhook = "fast"

[webhook.slow]
url = "{slow}"
secrets_env = "SLOW_SECRET"
timeout = 1

[webhook.fast]
url = "{fast}"
secrets = ["{fast_secret}"]
"""


def test_a_failing_endpoint_does_not_stall_another(
    outbox: Outbox, engine: Engine, receiver: Receiver, tmp_path: Path,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    slow = Receiver()
    slow.rule = lambda h: Reply(delay=5)
    try:
        fast_secret = new_secret()
        path = tmp_path / "routes.toml"
        path.write_text(ROUTES_TWO_HOOKS.format(slow=slow.url(), fast=receiver.url(),
                                                fast_secret=fast_secret))
        relay_factory(OUTBOX_ROUTES_FILE=str(path), OUTBOX_WEBHOOK_ALLOW_PRIVATE="true",
                      SLOW_SECRET=new_secret(), OUTBOX_WEBHOOK_BREAKER_FAILURES="3",
                      OUTBOX_WEBHOOK_BREAKER_COOLDOWN="60", OUTBOX_MAX_ATTEMPTS="100")
        _enqueue(engine, _msgs("s", 20, topic="slow.orders") + _msgs("f", 20, topic="fast.orders"))
        receiver.wait(lambda r: len(r.delivered()) == 20, 20, "the fast endpoint's messages")
        _enqueue(engine, _msgs("f", 20, topic="fast.orders", start=20))
        receiver.wait(lambda r: len(r.delivered()) == 40, 10, "more while the slow one is down")
        for hit in receiver.delivered():
            Webhook(fast_secret).verify(hit.body, hit.headers)
        # 16 in flight at once, plus the 2 started before the third timeout opened the circuit
        assert len(slow.snapshot()) <= 16 + 2, "the slow endpoint's circuit opened"
        wait_for(lambda: outbox.pending() == 20, 10, "the fast endpoint's rows marked sent")
        errors = [e for (e,) in outbox.sql("SELECT last_error FROM {t} WHERE sent_at IS NULL")]
        assert all("timed out after 1s" in e or "circuit open" in e for e in errors), errors
    finally:
        slow.close()


ROUTES_MIXED = """
[[route]]
topics = ["hooks.*"]
webhook = "main"

[[route]]
topics = "renamed.*"
kafka = "{topic}"

[[route]]
topics = "{topic}"
kafka = true

[webhook.main]
url = "{url}"
secrets_env = "MAIN_SECRET"
headers = {{ "X-Tenant" = "acme" }}
"""


def test_routes_file_splits_topics_between_kafka_and_a_webhook(
    outbox: Outbox, engine: Engine, receiver: Receiver, topic: str, kafka_bootstrap: str,
    tmp_path: Path, relay_factory: Callable[..., RelayProcess],
) -> None:
    secret = new_secret()
    path = tmp_path / "routes.toml"
    path.write_text(ROUTES_MIXED.format(topic=topic, url=receiver.url()))
    relay = relay_factory(OUTBOX_ROUTES_FILE=str(path), OUTBOX_WEBHOOK_ALLOW_PRIVATE="true",
                          MAIN_SECRET=secret)
    _enqueue(engine, _msgs("h", 5, topic="hooks.orders") + _msgs("k", 5, topic=topic)
             + _msgs("r", 2, topic="renamed.audit")
             + [Message("nowhere.at.all", {"x": 1}, idempotency_key="lost?")])
    receiver.wait(lambda r: len(r.delivered()) == 5, 30, "webhook deliveries")
    got = consume(kafka_bootstrap, topic, expected=7, timeout=30, settle=1)
    assert sorted(m.headers["idempotency-key"] for m in got) == sorted(
        [f"k-{i}" for i in range(5)] + ["r-0", "r-1"])
    assert sorted(receiver.delivered_ids()) == [f"h-{i}" for i in range(5)]
    for hit in receiver.delivered():
        Webhook(secret).verify(hit.body, hit.headers)
        assert hit.headers["x-tenant"] == "acme"
        assert hit.headers["outbox-topic"] == "hooks.orders"
    wait_for(lambda: outbox.pending() == 1, 15, "routed rows marked sent")
    error = outbox.sql("SELECT last_error FROM {t} WHERE idempotency_key = 'lost?'")[0][0]
    assert error is not None and "no route" in error and "nowhere.at.all" in error
    assert "no route" in relay.output()
    assert relay.terminate() == 0


def _cli_env(db_url: str, **env: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    return {**base, "OUTBOX_DATABASE_URL": db_url, "OUTBOX_HTTP_PORT": "0", **env}


def _one_error_line(done: Any) -> str:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("outbox-relay: error:")]
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("url", "allow", "needle"),
    [
        ("http://127.0.0.1:9/hook", "false", "127.0.0.1 is a loopback address"),
        ("http://localhost:9/hook", "false", "loopback"),
        ("http://[::1]:9/hook", "false", "loopback"),
        ("https://10.1.2.3/hook", "false", "private"),
        ("http://169.254.169.254/latest/meta-data", "true", "metadata"),
    ],
)
def test_ssrf_guard_refuses_at_start(db_url: str, url: str, allow: str, needle: str) -> None:
    done = run_cli("run", env=_cli_env(db_url, OUTBOX_SINK="webhook", OUTBOX_WEBHOOK_URL=url,
                                       OUTBOX_WEBHOOK_SECRET=new_secret(),
                                       OUTBOX_WEBHOOK_ALLOW_PRIVATE=allow))
    line = _one_error_line(done)
    assert needle in line and "SSRF" in line and "OUTBOX_WEBHOOK_URL" in line, line
    if allow == "false":
        assert "OUTBOX_WEBHOOK_ALLOW_PRIVATE=true" in line


@pytest.mark.parametrize(
    ("env", "routes", "needle"),
    [
        ({"OUTBOX_SINK": "webhook"}, None, "OUTBOX_WEBHOOK_URL is not set"),
        ({"OUTBOX_SINK": "webhook", "OUTBOX_WEBHOOK_URL": "https://x.example/h"}, None,
         "OUTBOX_WEBHOOK_SECRET is not set"),
        ({"OUTBOX_SINK": "webhook", "OUTBOX_WEBHOOK_URL": "https://x.example/h",
          "OUTBOX_WEBHOOK_SECRET": "whsec_s3cr3t!!"}, None, "OUTBOX_WEBHOOK_SECRET"),
        ({"OUTBOX_SINK": "webhook", "OUTBOX_WEBHOOK_URL": "ftp://x.example/h",
          "OUTBOX_WEBHOOK_SECRET": "@secret"}, None, "only http:// and https://"),
        ({"OUTBOX_SINK": "webhook", "OUTBOX_WEBHOOK_URL": "https://x.example/h",
          "OUTBOX_WEBHOOK_SECRET": "@secret", "OUTBOX_WEBHOOK_TIMEOUT": "0"}, None,
         "OUTBOX_WEBHOOK_TIMEOUT"),
        ({"OUTBOX_SINK": "webhook", "OUTBOX_WEBHOOK_URL": "https://x.example/h",
          "OUTBOX_WEBHOOK_SECRET": "@secret", "OUTBOX_WEBHOOK_HEADERS": '{"Webhook-Id": "x"}'},
         None, "OUTBOX_WEBHOOK_HEADERS: header 'Webhook-Id' is set by the relay"),
        ({}, '[[route]]\ntopics = "a"\nwebhook = "nope"\n', "unknown webhook 'nope'"),
        ({}, "[[route]\n", "invalid TOML"),
        ({}, '[[route]]\ntopics = "a"\nwebhook = "x"\n[webhook.x]\nurl = "https://x.example"\n'
             'secrets_env = "NOPE_UNSET"\n', "NOPE_UNSET"),
        ({"OUTBOX_WEBHOOK_URL": "https://x.example/h"}, '[[route]]\ntopics = "a"\nkafka = true\n',
         "not both"),
        ({"OUTBOX_ROUTES_FILE": "/nonexistent/routes.toml"}, None, "cannot read"),
    ],
)
def test_bad_webhook_config_is_one_clear_line(
    db_url: str, tmp_path: Path, env: dict[str, str], routes: str | None, needle: str
) -> None:
    secret = new_secret()
    env = {k: (secret if v == "@secret" else v) for k, v in env.items()}
    if routes is not None:
        path = tmp_path / "routes.toml"
        path.write_text(routes)
        env["OUTBOX_ROUTES_FILE"] = str(path)
    done = run_cli("run", env=_cli_env(db_url, **env))
    line = _one_error_line(done)
    assert needle in line, line
    assert secret not in done.stderr and "s3cr3t" not in done.stderr


def test_secret_and_url_token_never_in_logs_or_status(
    outbox: Outbox, engine: Engine, receiver: Receiver,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    secret = new_secret()
    token = f"tok-{uuid.uuid4().hex}"
    url = receiver.url(f"/hooks/{token}")
    # a careless endpoint that echoes everything back in its error body
    receiver.rule = lambda h: (Reply(500, body=f"bad: {secret} {url} {h.headers}".encode())
                               if h.attempt == 1 else Reply())
    relay = _start(relay_factory, receiver, secret, OUTBOX_WEBHOOK_URL=url,
                   OUTBOX_LOG_LEVEL="DEBUG", OUTBOX_RETRY_BACKOFF_BASE="0.1",
                   OUTBOX_POLL_INTERVAL="0.2", OUTBOX_KEEP_SENT="true")
    _enqueue(engine, _msgs("x", 3))
    receiver.wait(lambda r: len(r.delivered()) == 3, 30, "deliveries")
    wait_for(lambda: outbox.pending() == 0, 10, "marked sent")
    with urllib.request.urlopen(f"http://127.0.0.1:{relay.http_port}/readyz", timeout=5) as r:
        ready = r.read().decode()
    metrics = _metrics(relay)
    assert relay.terminate() == 0
    status = run_cli("status", "--json", env=outbox.env).stdout
    errors = " ".join(e for (e,) in outbox.sql("SELECT last_error FROM {t}"))
    text = relay.output() + ready + metrics + status + errors
    assert "HTTP 500" in text and f"127.0.0.1:{receiver.port}" in text, "the failure is reported"
    for needle in (secret, secret.removeprefix("whsec_"), token):
        assert needle not in text
