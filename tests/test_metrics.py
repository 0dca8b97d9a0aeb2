"""This process's counters (`knox_redis.stats()`) move by what happened, against a real
redis-server; the Prometheus collector reports them under their documented names, summed over
every process that published to PROMETHEUS_MULTIPROC_DIR; a forked child counts from zero.

The counters are the process's since it started, so each test compares before and after."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import connections
from django.utils import timezone
from freezegun import freeze_time
from knox.models import AuthToken
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import knox_redis
from knox_redis import cache, metrics
from tests.helpers import accepted, record_field
from tests.servers import free_port

COUNTERS = {
    "user_rows_hit",
    "user_rows_miss",
    "user_row_fills",
    "user_row_fills_refused",
    "local_hits",
    "local_evictions",
    "local_invalidations",
    "role_changes",
    "lookups_hit",
    "lookups_miss",
    "lookups_garbage",
    "lookups_bad_mac",
    "lookups_other_incarnation",
    "lookups_expired",
    "fills",
    "fills_refused",
    "revocations",
    "revocation_failures",
    "revoked_tokens",
    "revoked_records",
    "errors_timeout",
    "errors_connection",
    "errors_reply",
    "errors_circuit_open",
    "breaker_trips",
    "connections_opened",
}
GAUGES = {"breaker_open", "connections_idle", "local_cache_live"}
HISTOGRAM = {"call_duration_seconds_bucket", "call_duration_seconds_sum", "call_duration_seconds_count"}
BUCKETS = ["0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "+Inf"]
CALLS = "call_duration_seconds_count"


@contextmanager
def counting() -> Iterator[dict[str, int]]:
    """The counters (and the number of Redis calls) the block moved, and only those."""
    moved: dict[str, int] = {}
    before = knox_redis.stats()
    yield moved
    after = knox_redis.stats()
    for name in [*COUNTERS, CALLS]:
        if after[name] != before[name]:
            moved[name] = after[name] - before[name]


def warm_connection() -> None:
    """One call first, so the counts that follow don't include opening a connection."""
    cache.get_client().ping()


def test_stats_has_the_documented_names_and_types(transactional_db):
    stats = knox_redis.stats()
    assert set(stats) == COUNTERS | GAUGES | HISTOGRAM
    assert all(type(stats[name]) is int for name in COUNTERS | GAUGES | {CALLS})
    assert type(stats["call_duration_seconds_sum"]) is float
    assert list(stats["call_duration_seconds_bucket"]) == BUCKETS
    assert stats["call_duration_seconds_bucket"]["+Inf"] == stats[CALLS]
    json.dumps(stats, allow_nan=False)  # what `manage.py knox_redis --json stats` prints


def test_the_readme_documents_every_name():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### Metrics", 1)[1].split("\n## ", 1)[0]
    for name in COUNTERS | GAUGES | {"call_duration_seconds"}:
        assert f"`{name}" in section, name
    for name, *_ in metrics.FAMILIES:
        assert name in section, name
    assert "knox_redis_call_duration_seconds" in section


def test_stats_never_builds_a_client_nor_connects(transactional_db):
    cache.reset_client()
    with counting() as moved:
        stats = knox_redis.stats()
    assert cache._client is None
    assert moved == {}
    assert stats["connections_idle"] == 0
    assert stats["breaker_open"] == 0


def test_each_lookup_counts_under_its_outcome(make_token):
    token = make_token(write_through=True)
    row = AuthToken.objects.get()
    warm_connection()

    with counting() as moved:
        assert accepted(token)
    assert moved == {"lookups_hit": 1, CALLS: 1}

    with counting() as moved:
        assert not accepted(secrets.token_hex(32))  # a token nobody issued
    assert moved == {"lookups_miss": 1, CALLS: 1}

    key, field = record_field(token)
    good = cache.redis_command("HGET", key, field)
    cache.redis_command("HSET", key, field, b"\x00" * 12 + b"not a record")
    with counting() as moved:
        assert cache.lookup(row.token_key, row.digest).record is None
    assert moved == {"lookups_garbage": 1, CALLS: 1}  # undecodable: no MAC to check

    altered = bytearray(good)
    altered[-1] ^= 0x01  # the MAC's last byte
    cache.redis_command("HSET", key, field, bytes(altered))
    with counting() as moved:
        assert cache.lookup(row.token_key, row.digest).record is None
    assert moved == {"lookups_garbage": 1, "lookups_bad_mac": 1, CALLS: 1}


def test_a_hit_on_a_record_that_says_expired_counts_as_expired_too(make_token):
    token = make_token(write_through=True, expiry=timedelta(minutes=1))
    warm_connection()
    with freeze_time(timezone.now() + timedelta(minutes=2)), counting() as moved:
        assert not accepted(token)  # and the row is deleted, revoked first
    assert moved["lookups_hit"] == 1
    assert moved["lookups_expired"] == 1
    assert "lookups_miss" not in moved


def test_fills_count_stored_and_refused_after_a_revocation(make_token):
    token = make_token()  # Redis has never seen it
    row = AuthToken.objects.get()
    warm_connection()
    with counting() as moved:
        assert accepted(token)  # a first sight: read, cached under a fresh generation
    assert moved["fills"] == 1
    assert "fills_refused" not in moved

    found = cache.lookup(row.token_key, row.digest, create=True)
    cache.revoke([row])  # a logout between this request's lookup and its fill
    with counting() as moved:
        assert not cache._fill(cache._values(row), found.generation)
    assert moved == {"fills_refused": 1, CALLS: 1}


def test_revocations_count_calls_tokens_and_the_records_they_deleted(make_token, user, via):
    for _ in range(2):
        make_token(write_through=True)
    make_token()  # not cached
    rows = list(AuthToken.objects.all())
    warm_connection()
    with counting() as moved:
        cache.revoke(rows)  # autocommit: one call, no second one after commit
    assert moved == {"revocations": 1, "revoked_tokens": 3, "revoked_records": 2, CALLS: 1}

    via(f"redis://127.0.0.1:{free_port()}/0")  # nobody listens there
    with counting() as moved, pytest.raises(cache.RevocationUnavailable):
        cache.revoke(rows[:1])
    assert moved == {"revocation_failures": 1, "errors_connection": 1, "breaker_trips": 1, CALLS: 1}
    assert knox_redis.stats()["breaker_open"] == 1


def test_redis_errors_count_by_kind(make_token, proxy, via):
    via(proxy.url, cooldown=0.2)
    token = make_token(write_through=True)
    row = AuthToken.objects.get()
    warm_connection()

    with counting() as moved, pytest.raises(cache.CacheError):
        cache.redis_command("NOSUCHCOMMAND")
    assert moved == {"errors_reply": 1, CALLS: 1}
    assert knox_redis.stats()["breaker_open"] == 0  # Redis answered: not an outage
    warm_connection()  # (a call that fails drops its connection)

    proxy.blackhole()  # connections stay open, nothing answers
    with counting() as moved:
        assert cache.lookup(row.token_key, row.digest) is None
    assert moved == {"errors_timeout": 1, "breaker_trips": 1, CALLS: 1}
    assert knox_redis.stats()["breaker_open"] == 1

    with counting() as moved:
        for _ in range(3):
            assert cache.lookup(row.token_key, row.digest) is None
    assert moved == {"errors_circuit_open": 3}  # not sent, so not in the histogram either
    assert accepted(token)  # from the database


def test_the_breaker_trips_once_per_outage_and_its_gauge_follows_it(make_token, proxy, via):
    via(proxy.url, cooldown=0.1)
    make_token(write_through=True)
    row = AuthToken.objects.get()
    warm_connection()
    with counting() as moved:
        proxy.cut()
        assert cache.lookup(row.token_key, row.digest) is None  # trips
        time.sleep(0.15)
        assert cache.lookup(row.token_key, row.digest) is None  # the probe fails: still open
        assert knox_redis.stats()["breaker_open"] == 1
        proxy.heal()
        time.sleep(0.15)
        assert cache.lookup(row.token_key, row.digest).record is not None  # the probe closes it
        assert knox_redis.stats()["breaker_open"] == 0
        proxy.cut()
        assert cache.lookup(row.token_key, row.digest) is None  # a second outage
    assert moved["breaker_trips"] == 2
    assert moved["errors_connection"] == 3
    assert moved["lookups_hit"] == 1


def test_the_histogram_counts_every_call_that_reached_redis(make_token):
    token = make_token(write_through=True)
    warm_connection()
    before = knox_redis.stats()
    for _ in range(10):
        assert accepted(token)
    after = knox_redis.stats()
    assert after[CALLS] - before[CALLS] == 10
    buckets = after["call_duration_seconds_bucket"], before["call_duration_seconds_bucket"]
    delta = {le: buckets[0][le] - buckets[1][le] for le in BUCKETS}
    assert delta["+Inf"] == 10
    assert list(delta.values()) == sorted(delta.values())  # cumulative
    assert delta["0.25"] == 10  # loopback: none took a quarter of a second
    spent = after["call_duration_seconds_sum"] - before["call_duration_seconds_sum"]
    assert 0 < spent < 2.5


def test_connections_opened_and_idle(transactional_db):
    cache.reset_client()
    with counting() as moved:
        cache.get_client().ping()
        cache.get_client().ping()
    assert moved == {"connections_opened": 1, CALLS: 2}
    assert knox_redis.stats()["connections_idle"] == 1


# --- Prometheus -------------------------------------------------------------------------------


def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample the collector yields, through prometheus_client's own text format and parser."""
    registry = CollectorRegistry()
    registry.register(metrics.collector())
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_the_collector_reports_stats_under_prometheus_names(make_token):
    token = make_token(write_through=True)
    assert accepted(token)
    assert not accepted(secrets.token_hex(32))
    samples = scrape()
    stats = knox_redis.stats()
    for name, kind, _help, labels, keyed in metrics.FAMILIES:
        for label_values, key in keyed:
            sample = f"{name}_total" if kind == "counter" else name
            assert samples[(sample, tuple(zip(labels, label_values, strict=True)))] == stats[key], key
    assert samples[("knox_redis_lookups_total", (("outcome", "hit"),))] >= 1
    assert samples[("knox_redis_call_duration_seconds_count", ())] == stats[CALLS]
    for le in BUCKETS:
        bucket = ("knox_redis_call_duration_seconds_bucket", (("le", le),))
        assert samples[bucket] == stats["call_duration_seconds_bucket"][le]
    assert samples[("knox_redis_call_duration_seconds_sum", ())] == pytest.approx(stats["call_duration_seconds_sum"])


def test_the_metrics_view_serves_the_text_format(client, make_token):
    assert accepted(make_token(write_through=True))
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    hits = re.search(r'^knox_redis_lookups_total\{outcome="hit"\} (\S+)$', response.content.decode(), re.M)
    assert hits is not None
    assert float(hits.group(1)) == knox_redis.stats()["lookups_hit"]


def test_the_collector_registers_in_the_default_registry_without_reading_files():
    from prometheus_client import REGISTRY

    collector = metrics.collector()
    REGISTRY.register(collector)  # describe() names every family: no clash, no I/O
    try:
        assert "knox_redis_lookups_total" in generate_latest(REGISTRY).decode()
    finally:
        REGISTRY.unregister(collector)


# --- several processes (PROMETHEUS_MULTIPROC_DIR) ---------------------------------------------


@pytest.fixture
def multiproc_dir(tmp_path, monkeypatch) -> Iterator[Path]:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(metrics, "PUBLISH_INTERVAL", 0.05)
    yield tmp_path
    if metrics._publisher is not None:
        metrics._publisher.stop()
        metrics._publisher = None


def published(directory: Path, pid: int, **values: object) -> None:
    """A file as another process would have left it."""
    record = {"pid": pid, "process": f"{pid}_test", "live": values.pop("live", True), "metrics": values}
    (directory / f"knox_redis_{pid}_test.json").write_text(json.dumps(record))


def exited_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_the_collector_sums_every_process_and_drops_the_gauges_of_exited_ones(multiproc_dir):
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        killed, exited = exited_pid(), exited_pid()
        buckets = dict.fromkeys(BUCKETS, 0) | {"0.001": 2, "+Inf": 2}
        published(multiproc_dir, alive.pid, lookups_hit=5, breaker_open=1, connections_idle=3)
        # Killed before its exit handler could say so: the file still says live.
        published(multiproc_dir, killed, lookups_hit=7, connections_idle=2, call_duration_seconds_bucket=buckets)
        published(multiproc_dir, exited, live=False, lookups_hit=11, connections_idle=4, breaker_open=1)
        own = knox_redis.stats()
        samples = scrape()
        assert samples[("knox_redis_lookups_total", (("outcome", "hit"),))] == own["lookups_hit"] + 5 + 7 + 11
        assert samples[("knox_redis_connections_idle", ())] == own["connections_idle"] + 3
        assert samples[("knox_redis_breaker_open", ())] == own["breaker_open"] + 1
        assert samples[("knox_redis_call_duration_seconds_count", ())] == own[CALLS] + 2

        metrics.mark_process_dead(alive.pid)  # gunicorn's child_exit
        samples = scrape()
        assert samples[("knox_redis_lookups_total", (("outcome", "hit"),))] == own["lookups_hit"] + 5 + 7 + 11
        assert samples[("knox_redis_connections_idle", ())] == own["connections_idle"]
        assert samples[("knox_redis_breaker_open", ())] == own["breaker_open"]
    finally:
        alive.kill()
        alive.wait()


def test_a_file_left_under_this_pid_by_an_exited_process_is_counted_once(multiproc_dir, make_token):
    """pids are reused: the counts of the process that had this one before stay in the sum, once,
    beside this process's own file, and its gauges don't count as this process's."""
    published(multiproc_dir, os.getpid(), lookups_hit=13, connections_idle=9)
    own = knox_redis.stats()
    samples = scrape()
    assert samples[("knox_redis_lookups_total", (("outcome", "hit"),))] == own["lookups_hit"] + 13
    assert samples[("knox_redis_connections_idle", ())] == own["connections_idle"]

    assert accepted(make_token(write_through=True))  # builds the client: this process publishes
    deadline = time.monotonic() + 5
    while len(list(multiproc_dir.glob("knox_redis_*.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    names = sorted(p.name for p in multiproc_dir.glob("knox_redis_*.json"))
    assert names == sorted([f"knox_redis_{os.getpid()}_test.json", f"knox_redis_{metrics._publisher.process}.json"])
    own = knox_redis.stats()
    samples = scrape()
    assert samples[("knox_redis_lookups_total", (("outcome", "hit"),))] == own["lookups_hit"] + 13
    assert samples[("knox_redis_connections_idle", ())] == own["connections_idle"]


def child_counts(token: str, queue) -> None:
    connections.close_all()  # the parent's database connection is not the child's
    try:
        at_start = knox_redis.stats()
        for _ in range(2):
            assert accepted(token)
        after = knox_redis.stats()
        time.sleep(10 * metrics.PUBLISH_INTERVAL)  # let its publisher write
        queue.put((os.getpid(), at_start, after))
    except BaseException as exc:
        queue.put((os.getpid(), repr(exc), None))
    finally:
        connections.close_all()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_counts_from_zero_in_a_file_of_its_own(multiproc_dir, make_token):
    token = make_token(write_through=True)
    assert accepted(token)  # the parent counts, and publishes (like gunicorn --preload's master)
    assert knox_redis.stats()["lookups_hit"] >= 1
    connections.close_all()

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=child_counts, args=(token, queue))
    child.start()
    pid, at_start, after = queue.get(timeout=30)
    child.join(30)
    assert child.exitcode == 0, at_start
    assert {name: at_start[name] for name in COUNTERS} == dict.fromkeys(COUNTERS, 0)
    assert at_start[CALLS] == 0
    assert after["lookups_hit"] == 2

    (file,) = multiproc_dir.glob(f"knox_redis_{pid}_*.json")
    record = json.loads(file.read_text())
    assert record["metrics"]["lookups_hit"] == 2
    own = knox_redis.stats()
    samples = scrape()  # the child is gone (without running exit handlers): its counts stay
    assert samples[("knox_redis_lookups_total", (("outcome", "hit"),))] == own["lookups_hit"] + 2
    assert samples[("knox_redis_connections_idle", ())] == own["connections_idle"]


def test_a_bad_user_row_is_a_user_row_miss_not_a_garbage_token_lookup(settings, make_token, user):
    """A token hit whose USER_CACHE row fails its MAC counts one lookup (a hit) and one user
    row miss: `lookups_*` partition token lookups, and `lookups_bad_mac` means a record."""
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "USER_CACHE": True}
    token = make_token(write_through=True)
    assert accepted(token)
    assert accepted(token)
    key = cache.get_client().user_key(user.pk)
    row = bytearray(cache.redis_command("HGET", key, "u"))
    row[-1] ^= 1
    cache.redis_command("HSET", key, "u", bytes(row))
    before = knox_redis.stats()
    assert accepted(token)
    after = knox_redis.stats()
    moved = {k: after[k] - before[k] for k in COUNTERS if after[k] != before[k]}
    assert moved.get("lookups_hit") == 1
    assert "lookups_garbage" not in moved
    assert "lookups_bad_mac" not in moved
    assert moved.get("user_rows_miss") == 1


def test_a_failed_write_does_not_stop_publishing(tmp_path, monkeypatch, make_token):
    """A full disk for a moment: the publisher retries, and the file is written again."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(metrics, "PUBLISH_INTERVAL", 0.05)
    real_write = metrics._write
    failures = {"left": 1}

    def flaky(path, record):
        if failures["left"]:
            failures["left"] -= 1
            raise OSError(28, "No space left on device")
        real_write(path, record)

    monkeypatch.setattr(metrics, "_write", flaky)
    try:
        token = make_token(write_through=True)
        assert accepted(token)  # builds the client and the publisher: its first write fails
        deadline = time.monotonic() + 3
        while not list(tmp_path.glob(f"knox_redis_{os.getpid()}_*.json")):
            assert time.monotonic() < deadline, "the publisher never wrote again"
            time.sleep(0.05)
        assert metrics._publisher._thread.is_alive()
    finally:
        if metrics._publisher is not None:
            metrics._publisher.stop()
            metrics._publisher = None
