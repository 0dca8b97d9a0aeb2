"""knox_redis on a Redis Cluster (REDIS_CLUSTER_NODES): each call goes to the primary of its
key's slot, a revocation to every node holding a key it revokes, and neither a failover nor a
slot migration re-admits a revoked token."""

from __future__ import annotations

import time

import pytest
from django.contrib.auth import get_user_model
from knox.models import AuthToken

import knox_redis
from knox_redis import cache
from tests.conftest import auth_header, basic_header
from tests.helpers import accepted, queries_of
from tests.traffic import run_traffic_through

pytestmark = pytest.mark.cluster


def record_node(cluster, token: str):
    key = cache.get_client().token_key(token[:15])
    return cluster.node_for_key(key), key


def test_login_hit_and_logout(on_cluster, client, user):
    token = client.post("/api/login/", **basic_header("alice", "pw")).json()["token"]
    node, key = record_node(on_cluster, token)
    with node.client() as conn:
        assert any(f.startswith(b"r:") for f in conn.hkeys(key))  # written through, on its node
    ok, sql = queries_of(lambda: accepted(token))
    assert ok
    assert len(sql) == 1  # a hit: the user by primary key
    assert client.post("/api/logout/", **auth_header(token)).status_code == 204
    assert not accepted(token)
    with node.client() as conn:
        assert not any(f.startswith(b"r:") for f in conn.hkeys(key))


def test_logoutall_reaches_every_node(on_cluster, client, make_token, user):
    tokens = [make_token() for _ in range(12)]
    for token in tokens:
        assert accepted(token)  # cached, each on its slot's primary
    nodes = {record_node(on_cluster, t)[0].port for t in tokens}
    assert len(nodes) > 1, "the tokens should spread over the masters"
    assert client.post("/api/logoutall/", **auth_header(tokens[0])).status_code == 204
    for token in tokens:
        assert not accepted(token)
        node, key = record_node(on_cluster, token)
        with node.client() as conn:
            assert not any(f.startswith(b"r:") for f in conn.hkeys(key))


def test_user_cache_on_a_cluster(on_cluster, settings, make_token, user):
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "USER_CACHE": True}
    token = make_token()
    assert accepted(token)
    assert accepted(token)  # the row cached now, on the user's own slot
    ok, sql = queries_of(lambda: accepted(token))
    assert ok
    assert sql == []  # token and row from two nodes, no query
    # A token seen before: its lookup and its user's row went out together (one timed call,
    # not one per node), the row's node taken from the record seen then.
    calls = knox_redis.stats()["call_duration_seconds_count"]
    assert accepted(token)
    assert knox_redis.stats()["call_duration_seconds_count"] == calls + 1
    user.is_active = False
    user.save()
    assert not accepted(token)  # the row revoked before the save returned


def test_a_cluster_failover_readmits_no_revoked_token(on_cluster, client, make_token, user):
    revoked, kept = make_token(), make_token()
    for token in (revoked, kept):
        assert accepted(token)
    master = record_node(on_cluster, revoked)[0]
    AuthToken.objects.filter(token_key=revoked[:15]).delete()
    assert not accepted(revoked)
    on_cluster.failover(master)
    assert not accepted(revoked)
    assert accepted(kept)
    assert accepted(kept)


def test_lookups_follow_a_slot_migration(on_cluster, make_token, user):
    token = make_token()
    assert accepted(token)
    source, key = record_node(on_cluster, token)
    target = next(m for m in on_cluster.masters() if m is not source)
    seen: list[str] = []

    def traffic(step: str) -> None:
        seen.append(step)
        assert accepted(token)

    on_cluster.migrate_slot(on_cluster.keyslot(key), target, pause=traffic)
    assert record_node(on_cluster, token)[0] is target
    assert accepted(token)
    AuthToken.objects.filter(token_key=token[:15]).delete()
    assert not accepted(token)
    assert "migrating" in seen


def test_local_cache_is_refused_on_a_cluster(on_cluster, settings):
    from django.core.exceptions import ImproperlyConfigured

    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "LOCAL_CACHE_SIZE": 100}
    with pytest.raises(ImproperlyConfigured, match="LOCAL_CACHE_SIZE"):
        cache.get_client()


@pytest.mark.slow
def test_traffic_through_a_cluster_failover(on_cluster, transactional_db):
    masters = on_cluster.masters()
    run_traffic_through(lambda: [on_cluster.failover(master) for master in masters], what="failed over")


@pytest.mark.slow
def test_traffic_through_a_killed_master(on_cluster, transactional_db):
    """SIGKILL: its slots answer nothing until the others flag it and its replica is elected
    (node timeout 500 ms); meanwhile lookups there fall back to the database and logouts of
    its tokens are refused (503)."""
    master = on_cluster.masters()[0]
    run_traffic_through(lambda: on_cluster.kill_master(master), what="replica elected")


@pytest.mark.slow
def test_traffic_through_a_slot_migration(on_cluster, transactional_db):
    """The slots of the users' indexes (written by every login's fill) and of tokens the
    traffic logs out move to another master mid-traffic: ASK while the keys move, MOVED after."""
    native = cache.get_client()

    def migrate() -> None:
        users = get_user_model().objects.filter(username__startswith="user")
        keys = [native.user_key(u.pk) for u in users]
        keys += [native.token_key(t.token_key) for t in AuthToken.objects.order_by("-created")[:4]]
        for slot in sorted({on_cluster.keyslot(key) for key in keys}):
            source = on_cluster.master_for_slot(slot)
            on_cluster.migrate_slot(slot, next(m for m in on_cluster.masters() if m is not source))

    run_traffic_through(migrate, what="slots migrated")


def test_the_management_command_sees_every_node(on_cluster, make_token, user):
    import json
    from io import StringIO

    from django.core.management import call_command

    tokens = [make_token() for _ in range(12)]
    for token in tokens:
        assert accepted(token)
    nodes = {record_node(on_cluster, t)[0].port for t in tokens}
    assert len(nodes) > 1
    out = StringIO()
    call_command("knox_redis", "--json", "stats", stdout=out)
    # Every token's key and the user's index, wherever they live.
    assert json.loads(out.getvalue())["keys"] == len(tokens) + 1
    out = StringIO()
    call_command("knox_redis", "--json", "purge", "--noinput", stdout=out)
    assert json.loads(out.getvalue())["removed"] == len(tokens) + 1
    for master in on_cluster.masters():
        with master.client() as conn:
            assert conn.dbsize() == 0


def test_a_revocation_its_masters_replica_cannot_acknowledge_is_refused(on_cluster, client, make_token, user):
    """The replica is cut off (SIGSTOP) and not yet flagged as failed: the cluster could still
    promote it, without the revocation. Refused (503: the token stays valid everywhere), as
    long as the slot map lists that replica; taken again once it answers."""
    import signal

    token = make_token()
    assert accepted(token)
    master = record_node(on_cluster, token)[0]
    replica = on_cluster.replica_of(master)
    time.sleep(1.1)  # the slot map asked for again (each second), listing the replica now that
    assert accepted(token)  # it has replicated something (the cluster leaves out one at offset 0)
    # As with Redis' default node timeout (15 s): the replica is not flagged as failed for a
    # while after its primary stopped counting it online (no ack for a second).
    live = [node for node in on_cluster.nodes if node.alive and node is not replica]
    for node in live:
        with node.client() as conn:
            conn.config_set("cluster-node-timeout", 10_000)
    replica.process.send_signal(signal.SIGSTOP)
    try:
        assert client.post("/api/logout/", **auth_header(token)).status_code == 503
        deadline = time.monotonic() + 5
        while True:  # until its primary no longer counts it online (no ack for over a second)
            with master.client() as conn:
                if conn.info("replication")["slave0"]["lag"] > 1:
                    break
            assert time.monotonic() < deadline, "the primary kept counting the stopped replica online"
            time.sleep(0.1)
        assert client.post("/api/logout/", **auth_header(token)).status_code == 503
        assert accepted(token)  # nothing was deleted
    finally:
        replica.process.send_signal(signal.SIGCONT)
        for node in live:
            with node.client() as conn:
                conn.config_set("cluster-node-timeout", on_cluster.node_timeout_ms)
    deadline = time.monotonic() + 10
    while (status := client.post("/api/logout/", **auth_header(token)).status_code) == 503:
        assert time.monotonic() < deadline, "the revocation was never taken again"
        time.sleep(0.1)
    assert status == 204
    assert not accepted(token)


def test_the_index_forgets_revoked_tokens_by_the_next_revocation(on_cluster, client, make_token, user):
    """A revocation prunes the index entries of tokens revoked before, never its own: on a
    Cluster the index lives on another node than the token, and forgetting an entry whose
    revocation then failed would hide the token from the retry. A logout revokes twice
    (before the delete, and after commit): the second prunes the first's."""
    first, second = make_token(), make_token()
    for token in (first, second):
        assert accepted(token)
    native = cache.get_client()
    index_key = native.user_key(user.pk)
    index_node = on_cluster.node_for_key(index_key)
    with index_node.client() as conn:
        assert conn.hlen(index_key) == 2
    native.revoke([(first[:15], AuthToken.objects.get(token_key=first[:15]).digest, user.pk)])
    with index_node.client() as conn:
        assert conn.hlen(index_key) == 2  # not by the call that revoked it
    assert client.post("/api/logout/", **auth_header(second)).status_code == 204
    with index_node.client() as conn:
        assert conn.hlen(index_key) == 0  # the first by the logout's revocation, then the second
