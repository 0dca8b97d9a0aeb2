"""The Redis Cluster the suite starts for itself (tests/servers.py's ClusterSetup, the `cluster`
fixture of tests/conftest.py), pinned with redis-py alone before knox_redis has a cluster
client: three masters each serving its own hash tags, a manual failover, a killed master
replaced by its replica, a slot migrated step by step (ASK and TRYAGAIN mid-way, MOVED after),
and every test getting the cluster back as it started."""

from __future__ import annotations

import time

import pytest
import redis as redis_py
from redis.crc import key_slot

from tests import servers
from tests.servers import MIGRATION_STEPS, ClusterSetup, ClusterUnavailable, redis_server_version

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def redirect(exc: redis_py.exceptions.ResponseError) -> tuple[int, int]:
    """(slot, port) of a MOVED or ASK error."""
    return exc.slot_id, int(exc.node_addr[1])


def test_three_hash_tags_live_on_three_masters(cluster: ClusterSetup) -> None:
    masters = cluster.masters()
    assert len(masters) == 3
    assert len(cluster.seed_urls) == 6
    assert all(url.startswith("redis://127.0.0.1:") for url in cluster.seed_urls)
    client = cluster.cluster_client()
    tags = [cluster.hash_tag_on(master) for master in masters]
    for tag, master in zip(tags, masters, strict=True):
        for n in range(3):
            client.set(f"{tag}:k{n}", f"{master.port}:{n}")
        key = f"{tag}:k0"
        assert cluster.keyslot(key) == key_slot(key.encode())
        assert cluster.node_for_key(key) is master
        assert cluster.master_for_slot(cluster.keyslot(key)) is master
        with master.client() as own:
            assert own.mget([f"{tag}:k{n}" for n in range(3)]) == [f"{master.port}:{n}".encode() for n in range(3)]
        for other in masters:
            if other is not master:
                with other.client() as conn, pytest.raises(redis_py.exceptions.MovedError) as moved:
                    conn.get(key)
                assert redirect(moved.value) == (cluster.keyslot(key), master.port)
    # Each master's replica has its keys (read with READONLY, as a replica-reading client would).
    for tag, master in zip(tags, masters, strict=True):
        with master.client() as own:
            assert own.execute_command("WAIT", 1, 2000) == 1
        with cluster.replica_of(master).client() as replica:
            replica.execute_command("READONLY")
            assert replica.get(f"{tag}:k1") == f"{master.port}:1".encode()
    client.close()


def test_cluster_failover_swaps_a_master_and_its_replica(cluster: ClusterSetup) -> None:
    master = cluster.masters()[0]
    tag = cluster.hash_tag_on(master)
    slot = cluster.keyslot(tag)
    client = cluster.cluster_client()
    client.set(f"{tag}:k", "before")
    replica = cluster.replica_of(master)

    promoted = cluster.failover(master)

    assert promoted is replica
    assert cluster.master_for_slot(slot) is replica
    assert cluster.replica_of(replica) is master
    with replica.client() as conn:
        assert conn.info("replication")["role"] == "master"
        assert conn.get(f"{tag}:k") == b"before"  # a manual failover loses no write
    with master.client() as conn:
        assert conn.info("replication")["role"] == "slave"
        with pytest.raises(redis_py.exceptions.MovedError) as moved:
            conn.get(f"{tag}:k")
    assert redirect(moved.value) == (slot, replica.port)
    assert client.get(f"{tag}:k") == b"before"  # redis-py follows the MOVED
    client.set(f"{tag}:k", "after")
    assert client.get(f"{tag}:k") == b"after"
    client.close()


def test_a_killed_master_is_replaced_by_its_replica(cluster: ClusterSetup) -> None:
    master = cluster.masters()[1]
    tag = cluster.hash_tag_on(master)
    with master.client() as conn:
        conn.set(f"{tag}:k", "v")
        assert conn.execute_command("WAIT", 1, 2000) == 1
    replica = cluster.replica_of(master)

    began = time.monotonic()
    promoted = cluster.kill_master(master)
    took = time.monotonic() - began

    print(f"killed master replaced in {took:.2f} s (node timeout {cluster.node_timeout_ms} ms)")
    assert promoted is replica
    assert not master.alive
    assert cluster.node_for_key(f"{tag}:k") is replica
    assert took < 10  # ~1.5-3 s here: node timeout, FAIL agreed, 0.5-1 s election delay, vote
    client = cluster.cluster_client()
    assert client.get(f"{tag}:k") == b"v"
    client.close()

    # Back, it learns it was replaced and follows its replacement.
    cluster.restart(master)
    assert master.alive
    assert cluster.replica_of(replica) is master
    with master.client() as conn:
        assert conn.info("replication")["master_port"] == replica.port


def test_a_slot_migrating_answers_ask_and_tryagain_then_moved(cluster: ClusterSetup) -> None:
    source, destination, third = cluster.masters()
    tag = cluster.hash_tag_on(source)
    slot = cluster.keyslot(tag)
    keys = [f"{tag}:a", f"{tag}:b"]
    client = cluster.cluster_client()
    for key in keys:
        client.set(key, key)
    seen = []
    redis_7 = int(redis_server_version().split(".")[0]) >= 7

    def at(step: str) -> None:
        seen.append(step)
        with source.client() as src, destination.client() as dst:
            if step == "migrating":  # no key moved yet: the source still serves them all
                assert src.mget(keys) == [key.encode() for key in keys]
                with pytest.raises(redis_py.exceptions.AskError) as ask:
                    src.get(f"{tag}:new")  # a key it doesn't have: ask the destination
                assert redirect(ask.value) == (slot, destination.port)
            elif step == "batch" and seen.count("batch") == 1:  # one key moved (batch=1), one not
                (left,) = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 10)
                stayed = left.decode()
                gone = [key for key in keys if key != stayed]
                with pytest.raises(redis_py.exceptions.AskError) as ask:
                    src.get(gone[0])
                assert redirect(ask.value) == (slot, destination.port)
                assert src.get(stayed) == stayed.encode()
                # A multi-key command over both sides of the move: TRYAGAIN from the destination
                # (after ASKING), and from the source since Redis 7.0 (6.2's sends ASK).
                with destination.client(single_connection_client=True) as asking:
                    asking.execute_command("ASKING")
                    with pytest.raises(redis_py.exceptions.TryAgainError):
                        asking.mget(keys)
                source_answer = redis_py.exceptions.TryAgainError if redis_7 else redis_py.exceptions.AskError
                with pytest.raises(source_answer):
                    src.mget(keys)
                assert [client.get(key) for key in keys] == [key.encode() for key in keys]  # follows ASK
            elif step == "keys-moved":
                with pytest.raises(redis_py.exceptions.AskError):
                    src.get(keys[0])
                with pytest.raises(redis_py.exceptions.MovedError) as moved:
                    dst.get(keys[0])  # importing: only after ASKING
                assert redirect(moved.value) == (slot, source.port)
                assert [client.get(key) for key in keys] == [key.encode() for key in keys]
            elif step == "destination-owns":
                assert dst.mget(keys) == [key.encode() for key in keys]
            elif step == "source-released":
                with pytest.raises(redis_py.exceptions.MovedError) as moved:
                    src.get(keys[0])
                assert redirect(moved.value) == (slot, destination.port)

    cluster.migrate_slot(slot, destination, batch=1, pause=at)

    assert seen == ["importing", "migrating", "batch", "batch", "keys-moved", "destination-owns", "source-released"]
    assert set(seen) == set(MIGRATION_STEPS)
    assert cluster.master_for_slot(slot) is destination
    with third.client() as conn, pytest.raises(redis_py.exceptions.MovedError) as moved:
        conn.get(keys[0])
    assert redirect(moved.value) == (slot, destination.port)
    assert [client.get(key) for key in keys] == [key.encode() for key in keys]  # follows MOVED
    client.close()


def test_each_test_gets_the_cluster_as_it_started(cluster: ClusterSetup) -> None:
    # The tests above failed a master over, killed and restarted one, migrated a slot, wrote keys.
    assert cluster.is_pristine()
    client = cluster.cluster_client()
    assert client.dbsize(target_nodes=redis_py.RedisCluster.ALL_NODES) == 0
    client.close()


def test_no_redis_cli_is_a_reason_to_skip(monkeypatch, tmp_path) -> None:
    server = tmp_path / "redis-server"
    server.write_text("#!/bin/sh\n")
    server.chmod(0o755)
    monkeypatch.setenv(servers.FORCE, str(server))
    monkeypatch.setattr(servers.shutil, "which", lambda _name: None)
    with pytest.raises(ClusterUnavailable, match=r"no redis-cli beside .* nor on PATH"):
        servers.redis_cli_binary()
