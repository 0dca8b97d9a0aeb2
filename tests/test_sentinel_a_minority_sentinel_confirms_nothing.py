"""Review (Sentinel): the first sentinel that answers is believed, and its answer "settles" the
journal.

`Resolver::ask_sentinels` keeps the first answer. In a partition, a sentinel on the old
primary's side (a minority: it can't fail over, and it hears nothing of the majority's new
epoch) goes on naming the old primary P1. Each answer bumps `confirmed_at`, so
`Journal::record` drops revocations sent to P1 more than MARGIN (5 s) before the last
confirmation, as if they had reached the replicas. They haven't: the majority promoted P2
before they were sent. When the partition heals, P1 rejoins as P2's replica (its writes are
lost) and this process moves to P2, whose catch-up re-sends only the last 5 s: the token
logged out earlier is accepted again, from its record copied to P2 before the partition,
by this very process (and every other).

The sentinels are stand-ins speaking the protocol (a real one in the same spot answers the
same): before the partition all three name P1; during it, two are on the far side
(unreachable: they drop every connection); after the heal all three name P2.
Expected: an answer from one sentinel out of three neither confirms a primary nor settles
revocations (ask a majority, or compare config epochs), so the revocation is re-sent.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import redis as redis_py
from django.test import Client

from knox_redis import cache
from tests.servers import SentinelSetup, SentinelUnavailable
from tests.test_sentinel import auth_header, login, whoami

pytestmark = pytest.mark.slow


class FakeSentinel:
    """Answers SENTINEL GET-MASTER-ADDR-BY-NAME with `self.port` (and PING), nothing else."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = ("127.0.0.1", self.listener.getsockname()[1])
        self.closed = False
        self.reachable = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            while self.reachable:
                try:
                    data = conn.recv(4096)
                except OSError:
                    return
                if not data:
                    return
                buffer += data
                while True:
                    parsed = _parse(buffer)
                    if parsed is None:
                        break
                    args, buffer = parsed
                    conn.sendall(self._reply(args))

    def _reply(self, args: list[bytes]) -> bytes:
        name = args[0].upper() if args else b""
        if name == b"PING":
            return b"+PONG\r\n"
        if name == b"SENTINEL" and len(args) == 3 and args[1].upper() == b"GET-MASTER-ADDR-BY-NAME":
            host, port = b"127.0.0.1", str(self.port).encode()
            return b"*2\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(host), host, len(port), port)
        return b"-ERR unknown command\r\n"

    def close(self) -> None:
        self.closed = True
        self.listener.close()


def _parse(buffer: bytes) -> tuple[list[bytes], bytes] | None:
    """One RESP array of bulk strings from the front of `buffer`, or None if incomplete."""
    if not buffer.startswith(b"*") or b"\r\n" not in buffer:
        return None
    head, rest = buffer.split(b"\r\n", 1)
    args = []
    for _ in range(int(head[1:])):
        if b"\r\n" not in rest:
            return None
        size_line, rest = rest.split(b"\r\n", 1)
        size = int(size_line[1:])
        if len(rest) < size + 2:
            return None
        args.append(rest[:size])
        rest = rest[size + 2 :]
    return args, rest


@pytest.fixture
def nodes() -> Iterator[SentinelSetup]:
    """P1 and its replica P2, no real sentinel (one would turn a promoted P2 back)."""
    try:
        setup = SentinelSetup(sentinels=0).start()
    except SentinelUnavailable as exc:
        pytest.skip(str(exc))
    yield setup
    setup.stop()


def has_record(port: int, token: str) -> bool:
    return any(f.startswith(b"r:") for f in redis_py.Redis(port=port).hkeys(f"knox:token:{token[:15]}"))


def wait_until(condition, within: float = 10) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_revocation_confirmed_only_by_a_minority_sentinel_is_not_dropped(settings, user, nodes):
    p1 = nodes.primary.port
    (replica,) = nodes.replicas
    p2 = replica.port
    _minority, *majority = sentinels = [FakeSentinel(p1) for _ in range(3)]
    try:
        redis_py.Redis(port=p1).flushall()
        settings.REST_KNOX_REDIS = {
            # The service's three sentinels: one on this side, two across the partition.
            "SENTINELS": [sentinel.address for sentinel in sentinels],
            "SENTINEL_SERVICE_NAME": SentinelSetup.service,
            "CIRCUIT_BREAKER_COOLDOWN": 0.5,
        }
        native = cache.get_client()
        client = Client()
        token, other = login(client), login(client)
        assert whoami(client, token) == whoami(client, other) == 200
        assert native.primary_address == f"127.0.0.1:{p1}"
        wait_until(lambda: has_record(p2, token))  # replicated before the partition

        # The partition: the majority promotes P2. P1 still answers as a primary here.
        for sentinel in majority:
            sentinel.reachable = False
        redis_py.Redis(port=p2).execute_command("REPLICAOF", "NO", "ONE")
        assert client.post("/api/logout/", **auth_header(token)).status_code == 204  # sent to P1
        assert whoami(client, token) == 401

        # Requests go on; the minority sentinel keeps naming P1 each second.
        started = time.monotonic()
        while time.monotonic() - started < 6.5:
            whoami(client, other)
            time.sleep(0.2)
        # Another logout, later: recording it drops what the last confirmation "settled".
        third = login(client)
        client.post("/api/logout/", **auth_header(third))
        kept = native.stats()["revocations_kept"]

        # The partition heals: the sentinels agree on P2, P1 rejoins as its replica.
        for sentinel in sentinels:
            sentinel.port, sentinel.reachable = p2, True
        redis_py.Redis(port=p1).execute_command("REPLICAOF", "127.0.0.1", str(p2))
        wait_until(lambda: redis_py.Redis(port=p1).info("replication").get("master_link_status") == "up")
        # (The re-check backs off to 8 s while no majority answers.)
        wait_until(lambda: (whoami(client, other), native.primary_address)[1] == f"127.0.0.1:{p2}", within=15)
        assert whoami(client, token) == 401, (
            f"a token logged out (call returned 204) is accepted again after the heal; "
            f"the journal kept {kept} revocation(s) before it; P2 has its record: {has_record(p2, token)}"
        )
    finally:
        for sentinel in sentinels:
            sentinel.close()
