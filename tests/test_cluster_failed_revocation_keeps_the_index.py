"""Review of e3a00b6 (Redis Cluster): on a single server, revoke.lua reads a user's index,
revokes what it lists and prunes it in one script: all or nothing. On a Cluster the index is
pruned (HDEL, on the index's node) in the same round as, but independently of, the scripts
that revoke the tokens it listed (on their own nodes). When a token's node fails that round
(here: it doesn't answer within the deadline) the call raises RevocationUnavailable, but the
index on the healthy node has already forgotten the token. The caller does what the docs say
(retry): the retry reads an index that no longer lists the token, revokes nothing, returns
success; the token is accepted until MAX_CACHE_TTL.

The token's node is made slow deterministically with CLIENT PAUSE (clients only: the cluster
bus and replication go on, so no failover)."""

from __future__ import annotations

import time

import pytest
from knox.models import AuthToken

import knox_redis
from knox_redis import cache
from tests.helpers import accepted

pytestmark = pytest.mark.cluster


def test_a_revocation_failing_on_the_token_node_does_not_prune_the_index(on_cluster, make_token, user):
    native = cache.get_client()
    index_key = native.user_key(user.pk)
    index_node = on_cluster.node_for_key(index_key)
    # A token whose record lives on another node than the user's index.
    for _ in range(50):
        token = make_token()
        token_node = on_cluster.node_for_key(native.token_key(token[:15]))
        if token_node is not index_node:
            break
        AuthToken.objects.filter(token_key=token[:15]).delete()
    assert token_node is not index_node
    assert accepted(token)  # filled: index entry on index_node, record on token_node
    assert accepted(token)
    with index_node.client() as conn:
        assert conn.hlen(index_key) == 1

    AuthToken.objects.filter(user=user)._raw_delete(AuthToken.objects.db)  # behind Django's back
    assert accepted(token)  # the stale record: what invalidate_user_tokens is for

    with token_node.client() as conn:
        conn.execute_command("CLIENT", "PAUSE", 1500, "ALL")
    paused_at = time.monotonic()
    with pytest.raises(cache.RevocationUnavailable):
        knox_redis.invalidate_user_tokens(user.pk)  # the token's node doesn't answer in time
    time.sleep(max(0.0, 1.7 - (time.monotonic() - paused_at)))  # the pause is over

    with index_node.client() as conn:
        index_after_failure = conn.hlen(index_key)
    with token_node.client() as conn:
        record_kept = any(f.startswith(b"r:") for f in conn.hkeys(native.token_key(token[:15])))
    print(f"\nafter the failed call: index entries {index_after_failure}, record still on its node: {record_kept}")

    # The caller retries, as RevocationUnavailable asks it to; Redis is healthy again.
    knox_redis.invalidate_user_tokens(user.pk)
    time.sleep(0.3)  # past the breaker's cool-down
    assert not accepted(token), (
        "the failed call pruned the user's index on its node although the token's revocation "
        "failed on the other; the retry then revoked nothing and reported success"
    )
