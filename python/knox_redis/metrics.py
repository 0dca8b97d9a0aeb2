"""knox_redis' counters for Prometheus (with ``prometheus_client`` installed).

One process (runserver, a single worker)::

    from prometheus_client import REGISTRY
    REGISTRY.register(knox_redis.metrics.collector())
    # or, in urls.py, a page of its own:
    path("metrics", knox_redis.metrics.view)

Several worker processes (gunicorn, uWSGI): set ``PROMETHEUS_MULTIPROC_DIR``, as
prometheus_client's multiprocess mode asks, to an empty directory each worker can write, and
a scrape answered by any worker reports the sum over all of them, those that have exited
included (their counters; not their gauges). In gunicorn's config file, for workers killed
without running their exit handlers (a timeout, SIGKILL)::

    def child_exit(server, worker):
        from prometheus_client import multiprocess   # if you use it for your own metrics
        multiprocess.mark_process_dead(worker.pid)
        knox_redis.metrics.mark_process_dead(worker.pid)

How the sum is made, and why this way: the counters live in Rust, one relaxed atomic add per
event, and a request never does I/O for them. Each process that uses Redis starts one daemon
thread (``knox_redis-metrics``) that, every PUBLISH_INTERVAL seconds when something changed,
writes the process's snapshot to ``knox_redis_<pid>_<random>.json`` in that directory (a name
no later process reusing the pid can take): written whole to a temporary file, then renamed
over the last one, so a reader never sees half of one, and no process ever waits for another.
The collector adds its own process's live counters to every other process's file. A process
that exits marks its file dead (gauges no longer count; counters stay in the sum, so a total
never goes down when a worker is recycled). The price: other workers' counts are up to
PUBLISH_INTERVAL old at a scrape (Prometheus scrapes every 15 s or more), and a worker killed
with SIGKILL loses its last interval's counts. prometheus_client's own ``*.db`` files were the
alternative: writing them from here means its private mmap format, and its histogram takes
one observation at a time, not the buckets counted in Rust; Rust counters in a shared mmap
would have been exact but need unsafe code and a remap in each forked child before its first
count.

A forked child (gunicorn ``--preload``) starts from zero counters and a file of its own.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import suppress
from glob import escape, glob
from typing import Any, NamedTuple

from django.http import HttpRequest, HttpResponse

logger = logging.getLogger("knox_redis")

# Seconds between two snapshots a process publishes (only when one changed).
PUBLISH_INTERVAL = 1.0
FILE_PREFIX = "knox_redis_"
HISTOGRAM = "call_duration_seconds"
# Values that describe a process now, not events: a process that exited has none.
GAUGES = frozenset({"breaker_open", "connections_idle", "local_cache_live"})


class Family(NamedTuple):
    """One metric the collector yields: its samples' labels and keys in knox_redis.stats()."""

    name: str
    kind: str  # "counter" or "gauge"
    documentation: str
    labels: tuple[str, ...]
    samples: tuple[tuple[tuple[str, ...], str], ...]


def _one(name: str, kind: str, documentation: str, key: str) -> Family:
    return Family(name, kind, documentation, (), (((), key),))


# Every metric the collector yields (the histogram after these); README, "Metrics".
FAMILIES = (
    Family(
        "knox_redis_lookups",
        "counter",
        (
            "Token lookups Redis answered, by outcome: hit (a record that verified), miss (no record), "
            "garbage (a value that does not decode or whose MAC fails)."
        ),
        ("outcome",),
        ((("hit",), "lookups_hit"), (("miss",), "lookups_miss"), (("garbage",), "lookups_garbage")),
    ),
    _one(
        "knox_redis_lookups_expired",
        "counter",
        "Hits whose record says the token expired (it is deleted if the database agrees).",
        "lookups_expired",
    ),
    _one(
        "knox_redis_lookups_bad_mac",
        "counter",
        (
            "Garbage lookups whose record's MAC fails: written by someone without the signing key, or "
            "signed with a secret this process does not have."
        ),
        "lookups_bad_mac",
    ),
    _one(
        "knox_redis_lookups_other_incarnation",
        "counter",
        (
            "Misses whose record was written to another incarnation of Redis: restored from an older "
            "RDB/AOF file after a restart, or replicated before a failover. Read again from the database."
        ),
        "lookups_other_incarnation",
    ),
    Family(
        "knox_redis_fills",
        "counter",
        (
            "Attempts to cache a token read from the database: stored, or refused (a revocation, "
            "Redis forgetting the token's generation, or a restart or failover since the lookup)."
        ),
        ("result",),
        ((("stored",), "fills"), (("refused",), "fills_refused")),
    ),
    Family(
        "knox_redis_revocations",
        "counter",
        (
            "Revocation calls: ok (Redis took them), failed (the deletion was refused with a 503, or, "
            "after commit, is retried in the background)."
        ),
        ("result",),
        ((("ok",), "revocations"), (("failed",), "revocation_failures")),
    ),
    _one("knox_redis_revoked_tokens", "counter", "Tokens named by revocations Redis took.", "revoked_tokens"),
    _one("knox_redis_revoked_records", "counter", "Cached records those revocations deleted.", "revoked_records"),
    Family(
        "knox_redis_errors",
        "counter",
        (
            "Redis calls that failed, by kind: timeout, connection (refused, reset, closed), reply (an "
            "error reply or an unexpected one), circuit_open (not sent: the breaker was open)."
        ),
        ("kind",),
        (
            (("timeout",), "errors_timeout"),
            (("connection",), "errors_connection"),
            (("reply",), "errors_reply"),
            (("circuit_open",), "errors_circuit_open"),
        ),
    ),
    _one("knox_redis_breaker_trips", "counter", "Times a circuit breaker went from closed to open.", "breaker_trips"),
    _one(
        "knox_redis_breaker_open",
        "gauge",
        "Processes whose circuit breaker is open now (their requests skip Redis).",
        "breaker_open",
    ),
    Family(
        "knox_redis_user_rows",
        "counter",
        (
            "USER_CACHE: hits whose user row came back usable (hit: the user built with no query) or "
            "not (miss: read from the database, then cached)."
        ),
        ("outcome",),
        ((("hit",), "user_rows_hit"), (("miss",), "user_rows_miss")),
    ),
    Family(
        "knox_redis_user_row_fills",
        "counter",
        "USER_CACHE: attempts to cache a user row: stored, or refused (the user changed since the lookup).",
        ("result",),
        ((("stored",), "user_row_fills"), (("refused",), "user_row_fills_refused")),
    ),
    _one(
        "knox_redis_local_hits",
        "counter",
        "LOCAL_CACHE_SIZE: lookups served from the in-process cache, with no network call.",
        "local_hits",
    ),
    _one(
        "knox_redis_local_evictions",
        "counter",
        "LOCAL_CACHE_SIZE: entries dropped from the in-process cache to make room.",
        "local_evictions",
    ),
    _one(
        "knox_redis_local_invalidations",
        "counter",
        "LOCAL_CACHE_SIZE: invalidations applied to the in-process cache (Redis' pushes and own revocations).",
        "local_invalidations",
    ),
    _one(
        "knox_redis_role_changes",
        "counter",
        (
            "Calls that found their Redis had taken another role since the connection opened (a REPLICAOF "
            "sent by hand): refused there, idle connections dropped, retried on a new one."
        ),
        "role_changes",
    ),
    _one("knox_redis_connections_opened", "counter", "Connections to Redis opened.", "connections_opened"),
    _one("knox_redis_connections_idle", "gauge", "Idle pooled connections to Redis.", "connections_idle"),
    _one(
        "knox_redis_local_cache_live",
        "gauge",
        (
            "LOCAL_CACHE_SIZE: processes whose in-process cache is serving (its listener heard a heartbeat "
            "within the last second); below the number of workers: some serve from Redis only."
        ),
        "local_cache_live",
    ),
)
_HISTOGRAM_HELP = (
    "Duration of Redis calls (scripts and commands), connecting and a retry included, "
    "whatever their outcome; calls the breaker stopped are not in it."
)


def snapshot() -> dict[str, Any]:
    """This process's counters: what ``knox_redis.stats()`` returns."""
    from knox_redis import cache

    return cache.metrics()


# --- the collector ------------------------------------------------------------------------

try:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError:  # an optional dependency: stats() works without it
    Collector = object  # type: ignore[assignment,misc]


class KnoxRedisCollector(Collector):
    """knox_redis' metrics: this process's, or with PROMETHEUS_MULTIPROC_DIR set, the sum over
    every process that published to it."""

    def collect(self) -> Iterator[Metric]:
        return _families(_total(_snapshots()))

    def describe(self) -> Iterator[Metric]:
        # The names only, for the registry's duplicate check: no file read at registration.
        return _families({})


def collector() -> KnoxRedisCollector:
    """A collector to register: ``REGISTRY.register(knox_redis.metrics.collector())``."""
    if Collector is object:
        raise ImportError("knox_redis.metrics needs prometheus_client: pip install prometheus-client")
    return KnoxRedisCollector()


def view(request: HttpRequest) -> HttpResponse:
    """A Django view with knox_redis' metrics in Prometheus' text format. It has no
    authentication of its own: route it where only the scraper reaches it."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector())
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


def _families(values: dict[str, Any]) -> Iterator[Metric]:
    for name, kind, documentation, labels, samples in FAMILIES:
        family_class = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        family = family_class(name, documentation, labels=labels)
        for label_values, key in samples:
            family.add_metric(label_values, values.get(key, 0))
        yield family
    buckets = values.get(f"{HISTOGRAM}_bucket") or {"+Inf": 0}
    yield HistogramMetricFamily(
        f"knox_redis_{HISTOGRAM}",
        _HISTOGRAM_HELP,
        buckets=sorted(buckets.items(), key=lambda item: float(item[0])),
        sum_value=values.get(f"{HISTOGRAM}_sum", 0.0),
    )


def _total(snapshots: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Counters and histograms added up; gauges too (the caller drops dead processes' gauges)."""
    total: dict[str, Any] = {}
    buckets: dict[str, int] = {}
    for values in snapshots:
        for key, value in values.items():
            if key == f"{HISTOGRAM}_bucket" and isinstance(value, dict):
                for le, count in value.items():
                    buckets[le] = buckets.get(le, 0) + count
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                total[key] = total.get(key, 0) + value
    if buckets:
        total[f"{HISTOGRAM}_bucket"] = buckets
    return total


def _snapshots() -> list[dict[str, Any]]:
    """This process's live snapshot, and every other process's last published one."""
    own = snapshot()
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return [own]
    me = _publisher.process if _publisher is not None and _publisher.pid == os.getpid() else None
    found = [own]
    for path in glob(os.path.join(escape(directory), f"{FILE_PREFIX}*.json")):
        record = _read(path)
        if record is None or (me is not None and record.get("process") == me):
            continue  # unreadable (retired meanwhile), or this process's own: live above
        values = dict(record.get("metrics") or {})
        pid = record.get("pid")
        if not record.get("live") or pid == os.getpid() or not _alive(pid):
            # Exited (or a predecessor that had this process's pid): its counts stay, its
            # gauges describe nothing that exists.
            for gauge in GAUGES:
                values.pop(gauge, None)
        found.append(values)
    return found


def _read(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: it exists
    except OSError:
        return False
    return True


def mark_process_dead(pid: int, path: str | None = None) -> None:
    """Mark the file of worker `pid` dead (gunicorn's ``child_exit``): its gauges stop counting,
    its counters stay in the sum. Workers that exit normally do it themselves."""
    directory = path or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return
    for file in glob(os.path.join(escape(directory), f"{FILE_PREFIX}{int(pid)}_*.json")):
        record = _read(file)
        if record is not None and record.get("live") and record.get("pid") == pid:
            record["live"] = False
            _write(file, record)


def _write(path: str, record: dict[str, Any]) -> None:
    """Whole or not at all: readers see the old file or the new one."""
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f, separators=(",", ":"))
        os.replace(tmp, path)
    finally:
        with suppress(FileNotFoundError):
            os.unlink(tmp)


# --- publishing (PROMETHEUS_MULTIPROC_DIR) -------------------------------------------------


class Publisher:
    """Writes this process's snapshot to its file, from a daemon thread of its own."""

    THREAD_NAME = "knox_redis-metrics"

    def __init__(self, directory: str) -> None:
        self.pid = os.getpid()
        # Tells this process's file from one a dead process with the same pid left behind.
        self.process = f"{self.pid}_{uuid.uuid4().hex[:16]}"
        self.path = os.path.join(directory, f"{FILE_PREFIX}{self.process}.json")
        self._lock = threading.Lock()
        self._published: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.THREAD_NAME, daemon=True)

    def start(self) -> None:
        self._thread.start()
        atexit.register(self._at_exit)

    def stop(self) -> None:
        """Stop publishing (tests); the file stays, as the process's last word."""
        atexit.unregister(self._at_exit)
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _at_exit(self) -> None:
        # The last counts, and the mark that this process's gauges no longer count. The thread
        # stops first, so it can't write "live" over it afterwards.
        self._stop.set()
        try:
            self.publish(live=False)
        except Exception as exc:  # noqa: BLE001  (exiting: say why, never raise)
            logger.warning("knox_redis: can't publish metrics to %s at exit: %s", self.path, exc)

    def _run(self) -> None:
        """Publish every PUBLISH_INTERVAL until stopped. A failed write (a full disk, a
        remounted directory) is logged once, retried with back-off up to a minute, and its
        recovery logged once: a worker's file must not freeze for the rest of its life."""
        delay, failing = PUBLISH_INTERVAL, False
        while not self._stop.wait(delay):
            try:
                self.publish()
            except Exception as exc:  # noqa: BLE001  (this thread must outlive any one failure)
                if not failing:
                    logger.warning("knox_redis: can't publish metrics to %s, retrying: %s", self.path, exc)
                failing, delay = True, min(delay * 2, 60.0)
                continue
            if failing:
                logger.warning("knox_redis: publishing metrics to %s again", self.path)
            failing, delay = False, PUBLISH_INTERVAL

    def publish(self, *, live: bool = True) -> None:
        if os.getpid() != self.pid:
            return  # a forked child running its parent's exit handler: not its file
        values = snapshot()
        with self._lock:
            if live and values == self._published:
                return
            _write(self.path, {"pid": self.pid, "process": self.process, "live": live, "metrics": values})
            self._published = values


_publisher: Publisher | None = None
_publisher_lock = threading.Lock()


def publish_in_background() -> None:
    """Start this process's publisher, once, if PROMETHEUS_MULTIPROC_DIR is set (cache.py calls
    it when it builds a client: every process that may count something)."""
    global _publisher
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return
    with _publisher_lock:
        if _publisher is not None and _publisher.pid == os.getpid():
            return
        _publisher = Publisher(directory)
        _publisher.start()


def _forget_publisher_after_fork() -> None:
    global _publisher, _publisher_lock
    _publisher_lock = threading.Lock()
    _publisher = None  # the parent's, and its thread is not in this process


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_publisher_after_fork)
