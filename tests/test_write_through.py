"""Write-through at login: a token the ORM inserts is cached once its transaction commits, so
the first request with it is a hit; never before the commit, never if it rolled back, never
if it was deleted (or revoked anywhere) first; and a login costs knox's queries, no more."""

from __future__ import annotations

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from knox.models import AuthToken

from knox_redis import cache
from tests.conftest import auth_header, basic_header
from tests.helpers import authenticate, record_exists


def queries(fn):
    with CaptureQueriesContext(connection) as ctx:
        result = fn()
    return result, [q["sql"] for q in ctx.captured_queries]


def test_login_costs_knoxs_three_queries_and_the_first_request_is_a_hit(client, user, redis_conn):
    response, sql = queries(lambda: client.post("/api/login/", **basic_header("alice", "pw")))
    assert response.status_code == 200
    assert len(sql) == 3, sql  # the user, INSERT token, UPDATE last_login: as plain knox
    token = response.data["token"]
    assert record_exists(redis_conn, token)
    response, sql = queries(lambda: client.get("/api/whoami/", **auth_header(token)))
    assert response.status_code == 200
    assert len(sql) == 1, sql  # the user by primary key: a hit
    assert cache.get_client().stats()["hits"] == 1


def test_authtoken_objects_create_writes_through(user, redis_conn):
    _row, token = AuthToken.objects.create(user=user)
    assert record_exists(redis_conn, token)
    (_user, auth_token), sql = queries(lambda: authenticate(token))
    assert len(sql) == 1, sql
    assert auth_token.digest == _row.digest


def test_cached_only_once_the_transaction_commits(user, redis_conn):
    with transaction.atomic():
        _row, token = AuthToken.objects.create(user=user)
        assert not record_exists(redis_conn, token)
    assert record_exists(redis_conn, token)


def test_a_rolled_back_token_is_never_cached(user, redis_conn):
    with pytest.raises(RuntimeError), transaction.atomic():
        _row, _token = AuthToken.objects.create(user=user)
        raise RuntimeError("rolled back")
    assert redis_conn.dbsize() == 0


def test_a_token_deleted_in_the_same_transaction_is_not_cached(user, redis_conn):
    with transaction.atomic():
        row, token = AuthToken.objects.create(user=user)
        row.delete()
    assert not record_exists(redis_conn, token)
    assert not AuthToken.objects.exists()


def test_deleted_in_the_same_transaction_even_if_redis_lost_the_revocation(user, redis_conn):
    """The delete's revocation would refuse the fill; with Redis flushed before the commit,
    the process's own note of the delete still cancels it."""
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
