"""Threaded login/authenticate/logout traffic through a topology change (a Sentinel or a
Cluster failover, a killed primary): no 500, and no token accepted once its logout returned."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

from django.db import connections
from django.test import Client

from tests.conftest import auth_header, basic_header


def login(client: Client, username: str = "alice", password: str = "pw") -> str:
    response = client.post("/api/login/", **basic_header(username, password))
    assert response.status_code == 200, response.content
    return response.json()["token"]


def whoami(client: Client, token: str) -> int:
    return client.get("/api/whoami/", **auth_header(token)).status_code


def logout_until_taken(client: Client, token: str, within: float = 10) -> int:
    """Logout, retried while Redis refuses it (503): the last status."""
    deadline = time.monotonic() + within
    while True:
        status = client.post("/api/logout/", **auth_header(token)).status_code
        if status != 503 or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


class Traffic:
    """Threads that log in, authenticate and log out in a loop, each as its own user, and one
    that logs out older tokens (cached before the test began) one by one; each checks that no
    token is accepted once a logout of it has returned (its own, or another thread's)."""

    def __init__(self, users: list[str], older: list[str]) -> None:
        self.users = users
        self.older = older
        self.stop = threading.Event()
        self.statuses: Counter[tuple[str, int]] = Counter()
        self.revoked: list[tuple[str, float]] = []  # (token, when its logout returned)
        self.accepted_revoked: list[tuple[str, float]] = []
        self.errors: list[BaseException] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(name,)) for name in users]
        self.threads.append(threading.Thread(target=self.revoke_older))

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)

    def count(self, kind: str, status: int) -> int:
        with self.lock:
            self.statuses[(kind, status)] += 1
        return status

    def check_revoked(self, client: Client, token: str, returned_at: float) -> None:
        started = time.monotonic()
        status = self.count("auth revoked", whoami(client, token))
        if status != 401 and started > returned_at:
            self.accepted_revoked.append((token, started - returned_at))

    def logout(self, client: Client, token: str) -> None:
        """Log out (retried while refused), then check the token and another revoked one."""
        while self.count("logout", client.post("/api/logout/", **auth_header(token)).status_code) == 503:
            self.count("auth while logout refused", whoami(client, token))
            time.sleep(0.02)
        returned = time.monotonic()
        with self.lock:
            self.revoked.append((token, returned))
            sample = random.choice(self.revoked)
        self.check_revoked(client, token, returned)
        self.check_revoked(client, *sample)

    def run(self, username: str) -> None:
        client = Client()
        try:
            while not self.stop.is_set():
                response = client.post("/api/login/", **basic_header(username, "pw"))
                if self.count("login", response.status_code) != 200:
                    continue
                token = response.json()["token"]
                for _ in range(3):
                    self.count("auth", whoami(client, token))
                self.logout(client, token)
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            connections.close_all()

    def revoke_older(self) -> None:
        client = Client()
        try:
            for token in self.older:
                if self.stop.is_set():
                    break
                self.logout(client, token)
                time.sleep(0.05)
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            connections.close_all()

    def summary(self) -> str:
        by_kind = {f"{kind} {status}": n for (kind, status), n in sorted(self.statuses.items())}
        return f"{sum(self.statuses.values())} requests: {by_kind}"


def failed_calls(stats: dict) -> int:
    """Redis calls that failed or that the breaker spared: each a lookup served by the
    database alone, or a revocation refused (503)."""
    return sum(stats[k] for k in ("errors_timeout", "errors_connection", "errors_reply", "errors_circuit_open"))


def run_traffic_through(event, *, what: str, before: float = 1.0, after: float = 2.0):
    """Traffic (4 users, and one thread logging out tokens cached before) while `event()`
    changes the topology; asserts no 500, no token accepted once its logout returned (then or
    later), only the expected statuses, enough logouts taken, and hits again after the event.
    Returns `event()`'s result. knox_redis must already point at the topology."""
    from django.contrib.auth import get_user_model

    import knox_redis
    from knox_redis import cache

    names = [f"user{i}" for i in range(4)]
    for name in names:
        get_user_model().objects.create_user(username=name, password="pw")
    cache.get_client()  # built here, not in the threads (a settings change would rebuild it)
    client = Client()
    older = [login(client, "user0") for _ in range(int((before + after) / 0.05) + 40)]
    assert {whoami(client, token) for token in older} == {200}  # cached before the event
    stats_before = knox_redis.stats()
    traffic = Traffic(names, older)
    traffic.start()
    try:
        time.sleep(before)
        started = time.monotonic()
        result = event()
        took = time.monotonic() - started
        hits_at_recovery = knox_redis.stats()["lookups_hit"]
        time.sleep(after)
    finally:
        traffic.finish()
    stats = knox_redis.stats()
    fallbacks = failed_calls(stats) - failed_calls(stats_before)
    print(f"\n{traffic.summary()}; Redis calls failed or short-circuited: {fallbacks}; {what} after {took:.1f}s")
    assert not traffic.errors, traffic.errors
    assert not traffic.accepted_revoked, traffic.accepted_revoked
    assert {whoami(client, token) for token, _ in traffic.revoked} == {401}  # nor later
    kinds = {(kind, status) for kind, status in traffic.statuses}
    assert kinds <= {
        ("login", 200),
        ("auth", 200),
        ("logout", 204),
        ("logout", 503),
        ("auth while logout refused", 200),
        ("auth revoked", 401),
    }, traffic.summary()
    assert traffic.statuses[("logout", 204)] >= 8, traffic.summary()
    assert stats["lookups_hit"] > hits_at_recovery, stats  # served by Redis again, not only the database
    return result
