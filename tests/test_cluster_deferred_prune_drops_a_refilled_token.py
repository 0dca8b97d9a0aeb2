"""Second review (f000f0e): index entries of revoked tokens are pruned by the *next*
revocation of this process, as long as `Instant::now() + REVOCATION_TOMBSTONE_TTL` (taken when
the revocation *returned*) has not passed (Cluster::defer_prunes/take_prunes). The token's
tombstone, though, was written by the script on the token's node with `TIME + ttl` taken when
the script *ran*. Everything between the script and the return (the other nodes' replies, the
WAIT, a slow node) is a window in which the tombstone has lapsed while the prune is still
armed. A token still valid in the database (invalidate_token, a rolled-back delete, an admin
edit: revoke_before_update) is legitimately re-filled in that window (index entry re-added,
record cached), and the next revocation of anything then deletes its index entry: the index
no longer lists a cached record ("the index always lists at least what is cached" is broken).
invalidate_user_tokens, documented to cover "tokens only Redis remembers (rows already
gone)", then misses it and the token is accepted after the call returned.

The window is widened deterministically: the revocation of T also carries an earlier prune
for a node that is CLIENT PAUSEd for 0.7 s (its reply comes late, the script on T's node ran at
once)."""

from __future__ import annotations

import time

import pytest
from django.contrib.auth import get_user_model
from knox.models import AuthToken

import knox_redis
from knox_redis import cache
from tests.helpers import accepted, on_the_cluster

pytestmark = pytest.mark.cluster

TTL = 1.0


@pytest.fixture
def on_cluster(cluster, settings):
    return on_the_cluster(settings, cluster, SOCKET_TIMEOUT=1.0, REVOCATION_TOMBSTONE_TTL=TTL)


def server_ms(node) -> int:
    with node.client() as conn:
        seconds, micros = conn.time()
        return seconds * 1000 + micros // 1000


def test_deferred_prune_does_not_drop_the_index_entry_of_a_refilled_token(on_cluster, make_token, user):
    native = cache.get_client()
    bob = get_user_model().objects.create_user(username="bob", password="pw")
    bob_index_node = on_cluster.node_for_key(native.user_key(bob.pk))
    # T: alice's token, its record on another node than bob's index.
    for _ in range(50):
        t = make_token()
        token_node = on_cluster.node_for_key(native.token_key(t[:15]))
        if token_node is not bob_index_node:
            break
        AuthToken.objects.filter(token_key=t[:15]).delete()
    assert token_node is not bob_index_node
    t_row = AuthToken.objects.get(token_key=t[:15])
    x_row, _x = AuthToken.objects.create(user=bob)
    y_row, _y = AuthToken.objects.create(user=bob)
    alice_index = native.user_key(user.pk)
    alice_index_node = on_cluster.node_for_key(alice_index)
    t_field = bytes.fromhex(t_row.digest[:32])
    assert accepted(t)
    assert accepted(t)  # cached; alice's index lists it

    # An earlier revocation: its index entry (bob's index, on bob_index_node) is deferred.
    knox_redis.invalidate_token(x_row)
    # The revocation of T now also carries that prune: one of its nodes answers late.
    with bob_index_node.client() as conn:
        conn.execute_command("CLIENT", "PAUSE", 700, "ALL")
    knox_redis.invalidate_token(t_row)  # T stays valid in the database (dropped from the cache)
    returned = time.monotonic()
    with token_node.client() as conn:
        tombstone = int(conn.hget(native.token_key(t[:15]), f"t:{t_row.digest[:32]}"))
    lapses_in = (tombstone - server_ms(token_node)) / 1000
    print(f"\ntombstone lapses {lapses_in:.3f} s after the revocation returned; prune armed for {TTL:.3f} s")
    assert lapses_in < TTL - 0.3  # the window this test uses
    time.sleep(max(0.0, lapses_in + 0.05))

    # The tombstone has lapsed: T (valid) is read from the database and cached again.
    assert accepted(t)
    assert accepted(t)
    with alice_index_node.client() as conn:
        assert conn.hget(alice_index, t_field) is not None  # the fill re-indexed it
    # Any revocation of this process, while the prune is still armed.
    assert time.monotonic() - returned < TTL
    knox_redis.invalidate_token(y_row)
    with alice_index_node.client() as conn:
        listed = conn.hget(alice_index, t_field) is not None
    with token_node.client() as conn:
        cached = conn.hget(native.token_key(t[:15]), f"r:{t_row.digest[:32]}") is not None
    print(f"T cached: {cached}, listed in alice's index: {listed}")

    # T's row goes behind Django's back; invalidate_user_tokens is what the docs prescribe.
    AuthToken.objects.filter(pk=t_row.pk)._raw_delete(AuthToken.objects.db)
    knox_redis.invalidate_user_tokens(user.pk)
    assert not accepted(t), (
        "a deferred prune removed the index entry of a token re-cached after its tombstone "
        "lapsed: invalidate_user_tokens returned and the deleted token is still accepted"
    )


@pytest.fixture
def on_cluster_default_ttl(cluster, settings):
    return on_the_cluster(settings, cluster)


def test_deferred_prune_after_a_node_restart_does_not_drop_a_refilled_token(on_cluster_default_ttl, make_token, user):
    """The same, with the default REVOCATION_TOMBSTONE_TTL (60 s): the prune's safety rests on
    the tombstone standing for as long as the prune is armed, but a restart of the token's node
    (no persistence: the fixture's nodes run with save '' and appendonly no, it comes back as
    the master of its slots, empty) takes the tombstone with it. The window is then the whole
    TTL, not a few milliseconds."""
    on_cluster = on_cluster_default_ttl
    native = cache.get_client()
    bob = get_user_model().objects.create_user(username="bob", password="pw")
    t = make_token()
    t_row = AuthToken.objects.get(token_key=t[:15])
    y_row, _y = AuthToken.objects.create(user=bob)
    token_node = on_cluster.node_for_key(native.token_key(t[:15]))
    alice_index = native.user_key(user.pk)
    t_field = bytes.fromhex(t_row.digest[:32])
    assert accepted(t)
    assert accepted(t)

    knox_redis.invalidate_token(t_row)  # T stays valid; prune of alice's entry armed for 60 s
    on_cluster.restart(token_node)
    if on_cluster.node_for_key(native.token_key(t[:15])) is not token_node:
        pytest.skip("the replica was promoted before the node came back (the tombstone survived)")

    assert accepted(t)  # no tombstone any more: re-read and cached again
    assert accepted(t)
    knox_redis.invalidate_token(y_row)  # any revocation of this process: the armed prune runs
    with on_cluster.node_for_key(alice_index).client() as conn:
        listed = conn.hget(alice_index, t_field) is not None
    with token_node.client() as conn:
        cached = conn.hget(native.token_key(t[:15]), f"r:{t_row.digest[:32]}") is not None
    print(f"\nafter restart: T cached: {cached}, listed in alice's index: {listed}")

    AuthToken.objects.filter(pk=t_row.pk)._raw_delete(AuthToken.objects.db)
    knox_redis.invalidate_user_tokens(user.pk)
    assert not accepted(t), (
        "after a restart of the token's node, a deferred prune removed the index entry of the "
        "re-cached token: invalidate_user_tokens returned and the deleted token is still accepted"
    )
