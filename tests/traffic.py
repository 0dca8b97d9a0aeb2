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
