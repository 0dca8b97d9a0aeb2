"""Transactions the application manages by hand (`set_autocommit(False)`, then commit or
rollback): a token seen inside one that rolls back is never cached, and a hit inside one works
like any other. (Atomic blocks and ATOMIC_REQUESTS: test_consistency.py and test_refresh.py.)"""

from __future__ import annotations

from django.db import transaction
from knox.models import AuthToken

from tests.helpers import accepted, record_exists


def test_manual_transaction_rollback_is_never_cached(user, redis_conn):
    """A token created and authenticated in a hand-managed transaction that rolls back."""
    transaction.set_autocommit(False)
    try:
        _instance, token = AuthToken.objects.create(user=user)
        assert accepted(token)  # sees its own uncommitted row
        transaction.rollback()
    finally:
        transaction.set_autocommit(True)
    assert not AuthToken.objects.exists()
    assert not record_exists(redis_conn, token)
    assert not accepted(token)


def test_auto_refresh_hit_in_manual_transaction_is_not_a_500(user, settings):
    """A hit that AUTO_REFRESH renews raises nothing in a hand-managed transaction, though
    Django's on_commit() refuses to run under manual transaction management."""
    settings.REST_KNOX = {"AUTO_REFRESH": True, "MIN_REFRESH_INTERVAL": 0}
    _instance, token = AuthToken.objects.create(user=user)
    assert accepted(token)
    assert accepted(token)
    transaction.set_autocommit(False)
    try:
        assert accepted(token)  # hit + renew
        transaction.commit()
    finally:
        transaction.set_autocommit(True)
