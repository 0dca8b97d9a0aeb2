"""Review of e3a00b6 (Redis Cluster): a revocation that reads users' indexes
(`invalidate_user_tokens`, logoutall) must fail when an index can't be read, as revoke.lua does
on a single server ("Any other error must fail the revocation, not skip it": only WRONGTYPE is
skipped). On a Cluster, `revoke_in_cluster_by` treats *any* error reply to the round-1 HGETALL
as an empty index (`_ => continue`): a node answering CLUSTERDOWN (its view of the cluster is
failed: a master lost elsewhere, full coverage required), NOPERM, LOADING... makes the call
return success while the tokens only that index lists stay cached and accepted.

The node's CLUSTERDOWN is forced deterministically: the index's node un-assigns one slot of
its own (CLUSTER DELSLOTS), so with cluster-require-full-coverage (the default) it answers
CLUSTERDOWN to every keyed command until the slot is assigned back. The rest of the cluster
is untouched (no failover)."""

from __future__ import annotations

import time

import pytest
from knox.models import AuthToken

import knox_redis
from knox_redis import cache
from tests.helpers import accepted

pytestmark = pytest.mark.cluster


def _cluster_state(node) -> str:
    with node.client() as conn:
        info = conn.execute_command("CLUSTER", "INFO").decode()
    return dict(line.split(":", 1) for line in info.splitlines() if ":" in line)["cluster_state"].strip()


def test_invalidate_user_tokens_is_not_a_success_when_the_index_node_answers_clusterdown(on_cluster, make_token, user):
    token = make_token()
    assert accepted(token)  # miss, then filled: the user's index lists it
    assert accepted(token)
    native = cache.get_client()
    index_key = native.user_key(user.pk)
    index_node = on_cluster.node_for_key(index_key)
    with index_node.client() as conn:
        assert conn.hlen(index_key) == 1

    # Behind Django's back (what invalidate_user_tokens is documented for).
    AuthToken.objects.filter(user=user)._raw_delete(AuthToken.objects.db)
    assert accepted(token)  # the stale record, until told

    # The index's node now sees the cluster as down (another of its slots unassigned).
    index_slot = on_cluster.keyslot(index_key)
    own_slots = [s for s, owner in on_cluster._slot_owners(index_node).items() if owner == index_node.node_id]
    spare = next(s for s in own_slots if s != index_slot)
    with index_node.client() as conn:
        conn.execute_command("CLUSTER", "DELSLOTS", spare)
    raised = False
    try:
        deadline = time.monotonic() + 5
        while _cluster_state(index_node) != "fail":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        try:
            knox_redis.invalidate_user_tokens(user.pk)
        except cache.RevocationUnavailable:
            raised = True  # what a single server does: the caller knows nothing was revoked
    finally:
        with index_node.client() as conn:
            conn.execute_command("CLUSTER", "ADDSLOTS", spare)
        on_cluster.wait_converged(timeout=10)

    time.sleep(0.3)  # past the breaker's cool-down
    still_accepted = accepted(token)
    assert raised or not still_accepted, (
        "invalidate_user_tokens() returned normally although the user's index could not be read "
        "(CLUSTERDOWN on its node), and the token whose row is gone is still accepted"
    )
