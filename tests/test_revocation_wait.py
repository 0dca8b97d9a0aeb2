"""Revocations WAIT for a replica only if one acknowledges: a replication-stream consumer that
never sends REPLCONF (redis-cli --replica's SYNC, a CDC or backup tool: port 0, its lag
growing) is listed online in INFO replication, but WAIT never counts it; waiting for it would
refuse every logout (503) for as long as it stays attached."""

from __future__ import annotations

import contextlib
import shutil
import socket
import time

import redis as redis_py
from knox.models import AuthToken

from tests.conftest import auth_header
from tests.servers import RedisServer


def test_a_sync_consumer_that_never_acks_does_not_block_logouts(client, via, make_token):
    server = RedisServer().start()
    consumer = None
    try:
        via(server.url)
        conn = redis_py.Redis(port=server.port)
        consumer = socket.create_connection(("127.0.0.1", server.port))
        consumer.sendall(b"SYNC\r\n")  # as `redis-cli --replica` does
        deadline = time.monotonic() + 10
        while (conn.info("replication").get("slave0") or {}).get("state") != "online":
            assert time.monotonic() < deadline, conn.info("replication")
            consumer.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                consumer.recv(1 << 16)
            time.sleep(0.05)
        token = make_token()
        assert client.get("/api/whoami/", **auth_header(token)).status_code == 200
        response = client.post("/api/logout/", **auth_header(token))
        assert response.status_code == 204, response.status_code
        assert AuthToken.objects.count() == 0
    finally:
        if consumer is not None:
            consumer.close()
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)
