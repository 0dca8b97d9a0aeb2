"""Write-through at login: a token the ORM inserts is cached once its transaction commits, so
the first request with it is a hit; never before the commit, never if it rolled back, never
if it was deleted (or revoked anywhere) first; and a login costs knox's queries, no more."""

from __future__ import annotations

import pytest
from django.db import transaction
from django.utils import timezone
from knox.models import AuthToken
from rest_framework.exceptions import AuthenticationFailed

from knox_redis import cache
from tests.conftest import auth_header, basic_header
from tests.helpers import authenticate, queries_of, record_exists


def test_login_costs_knoxs_three_queries_and_the_first_request_is_a_hit(client, user, redis_conn):
    response, sql = queries_of(lambda: client.post("/api/login/", **basic_header("alice", "pw")))
    assert response.status_code == 200
    assert len(sql) == 3, sql  # the user, INSERT token, UPDATE last_login: as plain knox
    token = response.data["token"]
    assert record_exists(redis_conn, token)
    response, sql = queries_of(lambda: client.get("/api/whoami/", **auth_header(token)))
    assert response.status_code == 200
    assert len(sql) == 1, sql  # the user by primary key: a hit
    assert cache.get_client().stats()["hits"] == 1


def test_authtoken_objects_create_writes_through(user, redis_conn):
    _row, token = AuthToken.objects.create(user=user)
    assert record_exists(redis_conn, token)
    (_user, auth_token), sql = queries_of(lambda: authenticate(token))
    assert len(sql) == 1, sql
    assert auth_token.digest == _row.digest


def test_cached_only_once_the_transaction_commits(user, redis_conn):
    with transaction.atomic():
        _row, token = AuthToken.objects.create(user=user)
        assert not record_exists(redis_conn, token)
    assert record_exists(redis_conn, token)


def test_a_rolled_back_token_is_never_cached(user, redis_conn):
    with pytest.raises(RuntimeError), transaction.atomic():
        _row, token = AuthToken.objects.create(user=user)
        raise RuntimeError("rolled back")
    assert not record_exists(redis_conn, token)


def test_a_token_deleted_in_the_same_transaction_is_not_cached(user, redis_conn):
    with transaction.atomic():
        row, token = AuthToken.objects.create(user=user)
        row.delete()
    assert not record_exists(redis_conn, token)
    assert not AuthToken.objects.exists()


def test_deleted_in_the_same_transaction_even_if_redis_lost_the_revocation(user, redis_conn):
    """The delete's revocation would refuse the fill; with Redis flushed before the commit,
    the claimed generation is gone too, and the fill is refused all the same."""
    with transaction.atomic():
        row, token = AuthToken.objects.create(user=user)
        row.delete()
        redis_conn.flushall()
    assert not record_exists(redis_conn, token)


def test_a_revocation_between_commit_and_fill_wins(user, redis_conn):
    """Another process logs the token out right after the commit, before the write-through
    runs: the fill finds its generation and tombstone and is refused."""
    box = {}

    def logout_elsewhere() -> None:  # runs first: registered before the token exists
        row = AuthToken.objects.get(digest=box["digest"])
        cache.get_client().revoke([(row.token_key, row.digest, row.user_id)], [], 60_000)

    with transaction.atomic():
        transaction.on_commit(logout_elsewhere)
        row, token = AuthToken.objects.create(user=user)
        box["digest"] = row.digest
    assert not record_exists(redis_conn, token)


def test_no_write_through_under_manual_transaction_management(user, redis_conn):
    transaction.set_autocommit(False)
    try:
        _row, token = AuthToken.objects.create(user=user)
        transaction.commit()
    finally:
        transaction.set_autocommit(True)
    assert not record_exists(redis_conn, token)
    assert authenticate(token) is not None  # and nothing broke: the database path


def test_no_write_through_with_the_cache_disabled(user, redis_conn, settings):
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "CACHE_ENABLED": False}
    AuthToken.objects.create(user=user)
    assert redis_conn.dbsize() == 0


def test_write_through_with_redis_down_still_logs_in(client, user, settings):
    from tests.servers import free_port

    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    response = client.post("/api/login/", **basic_header("alice", "pw"))
    assert response.status_code == 200
    assert client.get("/api/whoami/", **auth_header(response.data["token"])).status_code == 200


def test_a_save_of_a_new_instance_over_an_existing_digest_still_revokes(user, redis_conn):
    """Only an INSERT skips the read before the save: a plain save() of a new instance may
    overwrite a row (Django tries an UPDATE first), so that one is still revoked."""
    row, token = AuthToken.objects.create(user=user)
    assert record_exists(redis_conn, token)
    AuthToken(digest=row.digest, token_key="x" * 15, user=user, created=row.created, expiry=row.expiry).save()
    assert not record_exists(redis_conn, token)


def test_a_logout_elsewhere_then_redis_forgetting_it_before_the_fill(user, redis_conn):
    """Another process deletes the new token right after the commit and returns, then Redis
    loses its revocation (flushed, evicted) before this process's fill runs: the claimed
    generation went with it, so the fill is refused (an empty Redis is not a licence)."""
    from django.db import connections

    box = {}

    def logout_elsewhere_then_flush() -> None:
        row = AuthToken.objects.get(digest=box["digest"])
        cache.get_client().revoke([(row.token_key, row.digest, row.user_id)], [], 60_000)
        with connections["default"].cursor() as cursor:  # the other process's DELETE
            cursor.execute("DELETE FROM knox_authtoken WHERE digest = %s", [row.digest])
        redis_conn.flushall()

    with transaction.atomic():
        transaction.on_commit(logout_elsewhere_then_flush)
        row, token = AuthToken.objects.create(user=user)
        box["digest"] = row.digest
    assert not record_exists(redis_conn, token)
    with pytest.raises(AuthenticationFailed):
        authenticate(token)


def test_a_claim_that_lapsed_before_the_commit_is_not_filled(user, redis_conn, settings):
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "REVOCATION_TOMBSTONE_TTL": 1}
    with transaction.atomic():
        _row, token = AuthToken.objects.create(user=user)
        redis_conn.delete(f"knox:token:{token[:15]}")  # as when the lease ran out
    assert not record_exists(redis_conn, token)


def test_a_token_rolled_back_by_a_manual_savepoint_is_not_cached(user, redis_conn):
    """Django drops on_commit callbacks only for atomic blocks' savepoints."""
    with transaction.atomic():
        sid = transaction.savepoint()
        _row, token = AuthToken.objects.create(user=user)
        transaction.savepoint_rollback(sid)
    assert not AuthToken.objects.exists()
    assert not record_exists(redis_conn, token)


def test_a_token_rolled_back_by_an_atomic_savepoint_is_not_cached(user, redis_conn):
    with transaction.atomic(), pytest.raises(RuntimeError), transaction.atomic():
        _row, token = AuthToken.objects.create(user=user)
        raise RuntimeError("rolled back to the savepoint")
    assert not record_exists(redis_conn, token)


def test_a_naive_expiry_under_use_tz_is_no_500(user, redis_conn):
    import datetime
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # Django warns about the naive time
        row = AuthToken(user=user, digest="ab" * 64, token_key="abababababababa", created=timezone.now())
        row.expiry = datetime.datetime.now() + datetime.timedelta(hours=1)  # noqa: DTZ005
        row.save(force_insert=True)
    assert AuthToken.objects.filter(digest="ab" * 64).exists()


def test_savepoints_that_cant_undo_the_insert_dont_stop_the_fill(user, redis_conn):
    """A savepoint released before the INSERT, or one made (and rolled back) after it, leaves
    the token committed: it is cached."""
    with transaction.atomic():
        transaction.savepoint_commit(transaction.savepoint())
        _row, token = AuthToken.objects.create(user=user)
        transaction.savepoint_rollback(transaction.savepoint())
    assert AuthToken.objects.exists()
    assert record_exists(redis_conn, token)


def test_a_token_rolled_back_to_a_savepoint_from_before_clean_savepoints_is_not_cached(user, redis_conn):
    """clean_savepoints() resets the counter savepoint ids are made from: a savepoint made
    before it can't be told from one made after by its id, so its rollback drops the fill."""
    with transaction.atomic():
        sid = transaction.savepoint()
        transaction.clean_savepoints()
        _row, token = AuthToken.objects.create(user=user)
        transaction.savepoint_rollback(sid)
    assert not AuthToken.objects.exists()
    assert not record_exists(redis_conn, token)


def test_an_aware_expiry_without_use_tz_is_no_500(user, settings):
    import datetime

    settings.USE_TZ = False
    row = AuthToken(user=user, digest="cd" * 64, token_key="cdcdcdcdcdcdcdc", created=datetime.datetime.now())  # noqa: DTZ005
    row.expiry = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
    try:
        row.save(force_insert=True)
    except ValueError:
        pytest.skip("this backend refuses aware datetimes without USE_TZ (SQLite)")
    assert AuthToken.objects.filter(digest="cd" * 64).exists()
