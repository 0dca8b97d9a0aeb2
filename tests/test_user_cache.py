"""USER_CACHE: a hit builds the user from the row cached in Redis, with no database query, and
every ORM save or delete of the user (proxies and multi-table children included) revokes that
row first, under the same lease as tokens: once the save has returned, no request is
authenticated from the old row, even with a fill in flight."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.signals import user_logged_in
from django.contrib.postgres.fields import ArrayField
from django.db import connection, models, transaction
from django.db.models.signals import pre_save
from django.test.utils import isolate_apps
from django.utils import timezone
from freezegun import freeze_time
from knox.models import AuthToken

import knox_redis
from knox_redis import cache, users
from knox_redis.checks import check_user_cache, user_cache_errors
from tests.conftest import auth_header, basic_header
from tests.helpers import accepted, authenticate, in_thread
from tests.servers import free_port
from tests.userapp.models import Customer, UserProxy


@pytest.fixture
def user_cache(settings):
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "USER_CACHE": True}


def row_cached(redis_conn, user) -> bool:
    return bool(redis_conn.hexists(f"knox:user:{user.pk}:ix", "u"))


def cached(token: str) -> None:
    """Authenticate twice: the first request caches the user's row, the second is built from it."""
    assert accepted(token)
    assert accepted(token)


@pytest.mark.parametrize(("user_cache_on", "queries"), [(False, 1), (True, 0)])
def test_queries_per_hit(settings, make_token, django_assert_num_queries, user_cache_on, queries):
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "USER_CACHE": user_cache_on}
    token = make_token(write_through=True)
    with django_assert_num_queries(1):  # the user, by primary key (then cached with USER_CACHE)
        assert accepted(token)
    with django_assert_num_queries(queries):
        user, auth_token = authenticate(token)
    assert user.username == "alice"
    assert auth_token.user is user


def test_the_user_is_built_as_a_query_builds_it(user_cache, make_token, user, django_assert_num_queries):
    user.first_name, user.email = "Alice", "alice@example.com"
    user.save()
    token = make_token(write_through=True)
    cached(token)
    with django_assert_num_queries(0):
        built, _auth_token = authenticate(token)
    for field in users.cached_fields(type(user)):
        assert getattr(built, field.attname) == getattr(user, field.attname), field.name
    assert built._state.db == "default"
    assert not built._state.adding
    # The password hash never leaves the database: deferred, loaded when touched.
    assert built.get_deferred_fields() == {"password", "last_login"}
    with django_assert_num_queries(1):
        assert built.check_password("pw")


def test_the_password_hash_is_never_in_redis(user_cache, make_token, user, redis_conn):
    cached(make_token(write_through=True))
    assert row_cached(redis_conn, user)
    for key in redis_conn.keys("*"):
        for value in redis_conn.hvals(key):
            assert user.password.encode() not in value
            assert user.password.split("$")[-1].encode() not in value


def test_a_deactivated_user_is_rejected_at_once(user_cache, make_token, user, redis_conn):
    token = make_token(write_through=True)
    cached(token)
    user.is_active = False
    user.save()
    assert not row_cached(redis_conn, user)
    assert not accepted(token)


def test_a_change_is_seen_by_the_next_request(user_cache, make_token, user):
    token = make_token(write_through=True)
    cached(token)
    user.first_name = "Renamed"
    user.save(update_fields=["first_name"])
    assert authenticate(token)[0].first_name == "Renamed"


def test_a_deleted_user_is_rejected(user_cache, make_token, user, redis_conn):
    token = make_token(write_through=True)
    cached(token)
    get_user_model().objects.filter(pk=user.pk).delete()  # cascades to the tokens
    assert not accepted(token)
    assert not row_cached(redis_conn, user)


def test_saves_through_a_proxy_or_a_multi_table_child_revoke_the_row(user_cache, transactional_db, redis_conn):
    customer = Customer.objects.create_user(username="carol", password="pw")
    _instance, token = AuthToken.objects.create(user=customer)
    cached(token)
    assert row_cached(redis_conn, customer)

    proxied = UserProxy.objects.get(pk=customer.pk)
    proxied.first_name = "Carol"
    proxied.save()
    assert not row_cached(redis_conn, customer)
    assert authenticate(token)[0].first_name == "Carol"

    cached(token)
    child = Customer.objects.get(pk=customer.pk)
    child.is_active = False
    child.save()  # writes the user's table and the child's
    assert not accepted(token)


def test_every_model_that_writes_the_users_row_is_connected():
    user_model = get_user_model()
    for model in (user_model, UserProxy, Customer):
        assert pre_save.has_listeners(model), model


def test_a_login_does_not_revoke_the_row(user_cache, make_token, user, redis_conn, client, django_assert_num_queries):
    token = make_token(write_through=True)
    cached(token)
    # knox's LoginView sends user_logged_in: Django saves last_login (update_fields), which
    # is deferred, never cached.
    user_logged_in.send(sender=type(user), request=None, user=user)
    assert row_cached(redis_conn, user)
    response = client.post("/api/login/", **basic_header("alice", "pw"))
    assert response.status_code == 200
    assert row_cached(redis_conn, user)
    with django_assert_num_queries(0):
        assert accepted(token)
    with django_assert_num_queries(0):  # the new token: written through, and the row is cached
        assert accepted(response.json()["token"])


def test_a_password_change_keeps_the_row(user_cache, make_token, user, redis_conn):
    token = make_token(write_through=True)
    cached(token)
    user.set_password("new")
    user.save(update_fields=["password"])
    assert row_cached(redis_conn, user)
    user.save()  # a full save may have changed anything: revoked
    assert not row_cached(redis_conn, user)
    assert accepted(token)


def test_a_save_is_refused_when_redis_cant_be_told(user_cache, make_token, user, via):
    token = make_token(write_through=True)
    cached(token)
    via(f"redis://127.0.0.1:{free_port()}/0")
    user.is_active = False
    with pytest.raises(cache.RevocationUnavailable):
        user.save()
    user.refresh_from_db()
    assert user.is_active  # the database kept the row as it was: no process can be stale


def test_without_user_cache_a_save_never_waits_on_redis(make_token, user, via):
    via(f"redis://127.0.0.1:{free_port()}/0")
    user.is_active = False
    user.save()
    user.refresh_from_db()
    assert not user.is_active


def test_without_user_cache_saves_still_revoke_rows_others_cached(settings, make_token, user, redis_conn):
    """A rollout turning USER_CACHE on: a process without it still tells Redis."""
    token = make_token(write_through=True)
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "USER_CACHE": True}
    cached(token)
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "USER_CACHE": False}
    user.is_active = False
    user.save()
    assert not row_cached(redis_conn, user)


def test_writes_that_bypass_signals_are_bounded_by_user_cache_ttl(user_cache, make_token, user):
    token = make_token(write_through=True)
    cached(token)
    get_user_model().objects.filter(pk=user.pk).update(is_active=False)  # no signal
    assert accepted(token)  # the cached row: the documented window
    with freeze_time(timezone.now() + timedelta(seconds=61)):
        assert not accepted(token)


def test_invalidate_user_ends_that_window(user_cache, make_token, user):
    token = make_token(write_through=True)
    cached(token)
    get_user_model().objects.filter(pk=user.pk).update(is_active=False)
    knox_redis.invalidate_user(user.pk)
    assert not accepted(token)


def test_a_lowered_user_cache_ttl_bounds_rows_cached_before(user_cache, make_token, user, settings):
    token = make_token(write_through=True)
    cached(token)
    get_user_model().objects.filter(pk=user.pk).update(is_active=False)
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "USER_CACHE_TTL": 5}
    with freeze_time(timezone.now() + timedelta(seconds=10)):
        assert not accepted(token)


def test_a_forged_or_moved_row_is_a_miss(user_cache, make_token, user, redis_conn, django_user_model):
    token = make_token(write_through=True)
    cached(token)
    key = f"knox:user:{user.pk}:ix"
    stored = redis_conn.hget(key, "u")
    redis_conn.hset(key, "u", stored[:-1] + bytes([stored[-1] ^ 1]))
    misses_before = cache.get_client().stats()["user_misses"]
    assert accepted(token)  # read from the database instead
    assert cache.get_client().stats()["user_misses"] == misses_before + 1  # a user-row miss
    # Another user's row planted under this user's key: its MAC names the other user.
    bob = django_user_model.objects.create_user(username="bob", password="pw", is_superuser=True)
    _instance, bob_token = AuthToken.objects.create(user=bob)
    cached(bob_token)
    redis_conn.hset(key, "u", redis_conn.hget(f"knox:user:{bob.pk}:ix", "u"))
    assert authenticate(token)[0].username == "alice"


def test_a_row_cached_for_another_version_of_the_model_is_a_miss(user_cache, make_token, user, redis_conn):
    token = make_token(write_through=True)
    cached(token)
    model = type(user)
    query = users.row_query(model, "default")
    values = [("", "0123456789abcdef"), *query.cached_values(query.fetch(user.pk))[1:]]
    _row, generation = cache.get_client().lookup_user(user.pk)
    cache.get_client().revoke([], user_rows=[user.pk], tombstone_ms=0)
    _row, generation = cache.get_client().lookup_user(user.pk, create=True)
    assert cache.get_client().fill_user(user.pk, generation, cache.to_us(timezone.now()) + 60_000_000, values, 60_000)
    assert authenticate(token)[0].username == "alice"  # re-read, not built from the odd row


def test_a_user_fill_in_flight_cannot_undo_a_deactivation(user_cache, make_token, user, monkeypatch):
    """The forced race: a request reads the active row, then the user is deactivated (the
    save returns), then the request's fill arrives. It is refused."""
    token = make_token(write_through=True)
    read_done, may_fill = threading.Event(), threading.Event()
    real = cache._fill_user

    def paused(*args):
        read_done.set()  # the user row has been read: active then
        assert may_fill.wait(10)
        return real(*args)

    monkeypatch.setattr(cache, "_fill_user", paused)
    thread, box = in_thread(accepted, token)
    assert read_done.wait(10)
    user.is_active = False
    user.save()  # returns here
    may_fill.set()
    thread.join(10)
    assert box.get("result") is True, box  # the request began before the save: fine
    monkeypatch.setattr(cache, "_fill_user", real)
    assert cache.get_client().stats()["user_fills_refused"] == 1
    assert not accepted(token)


def test_a_fill_between_the_revocation_and_the_commit_is_refused(user_cache, make_token, user, redis_conn):
    """A request that looks the row up after the save revoked it, but reads the row before
    the save commits: the tombstone stops its fill."""
    token = make_token(write_through=True)
    with transaction.atomic():
        user.is_active = False
        user.save()  # revoked; the UPDATE isn't committed
        thread, box = in_thread(accepted, token)
        thread.join(10)
        assert box.get("result") is True, box  # it read the still-committed row
        assert not row_cached(redis_conn, user)
    assert not row_cached(redis_conn, user)
    assert not accepted(token)


def test_atomic_requests_cache_the_row_after_commit(user_cache, make_token, user, client, monkeypatch, redis_conn):
    monkeypatch.setitem(connection.settings_dict, "ATOMIC_REQUESTS", True)
    token = make_token(write_through=True)
    assert client.get("/api/whoami/", **auth_header(token)).status_code == 200
    assert row_cached(redis_conn, user)
    assert cache.get_client().stats()["user_fills"] == 1


def test_nothing_cached_from_a_rolled_back_change(user_cache, make_token, user, redis_conn):
    class Rollback(Exception):
        pass

    token = make_token(write_through=True)
    cached(token)
    with pytest.raises(Rollback), transaction.atomic():
        user.first_name = "Uncommitted"
        user.save()
        assert authenticate(token)[0].first_name == "Uncommitted"  # this transaction sees it
        assert not row_cached(redis_conn, user)
        raise Rollback
    assert not row_cached(redis_conn, user)
    assert authenticate(token)[0].first_name == ""
    # No commit lifted the tombstone: it stands for its lease (the user is read each time).
    assert not row_cached(redis_conn, user)


def test_the_new_row_is_cached_right_after_the_save(user_cache, make_token, user, redis_conn):
    token = make_token(write_through=True)
    cached(token)
    user.first_name = "Committed"
    user.save()  # autocommit: revoked before, tombstone lifted after
    assert authenticate(token)[0].first_name == "Committed"
    assert row_cached(redis_conn, user)
    with transaction.atomic():
        user.first_name = "Again"
        user.save()
    assert authenticate(token)[0].first_name == "Again"
    assert row_cached(redis_conn, user)


def test_the_stock_user_model_passes_the_system_check(user_cache):
    assert check_user_cache() == []


@isolate_apps("tests.testapp")
def test_a_user_model_whose_columns_cant_be_cached_is_a_check_error():
    class TaggedUser(models.Model):  # noqa: DJ008  (a test model)
        name = models.CharField(max_length=10)
        tags = ArrayField(models.CharField(max_length=10))

        class Meta:
            app_label = "testapp"

    errors = user_cache_errors(TaggedUser)
    assert [e.id for e in errors] == ["knox_redis.E010"]
    assert "TaggedUser.tags" in errors[0].msg
    assert errors[0].hint


# --- holes a review found (each failed before its fix) ------------------------------------


def test_a_child_created_over_an_existing_user_revokes_the_row(user_cache, make_token, user):
    """`Customer.objects.create(user_ptr=user)` forces the INSERT of the child's table only
    and UPDATEs the existing user's row."""
    token = make_token(write_through=True)
    cached(token)
    Customer.objects.create(
        user_ptr=user, username=user.username, password=user.password, date_joined=user.date_joined, is_active=False
    )
    assert not get_user_model().objects.get(pk=user.pk).is_active
    assert not accepted(token)


def test_a_child_saved_with_pk_none_but_its_parent_id_set_revokes_the_row(user_cache, transactional_db, redis_conn):
    """Django's multi-table copy gotcha: `child.pk = None` clears only `user_ptr_id`; the save
    UPDATEs the user's row under the parent's `id`, still set."""
    customer = Customer.objects.create_user(username="carol", password="pw")
    _instance, token = AuthToken.objects.create(user=customer)
    cached(token)
    pk = customer.pk
    customer.pk = None
    customer.is_active = False
    customer.save()
    assert customer.pk == pk
    assert not accepted(token)


def test_a_save_of_a_childs_own_columns_leaves_the_row(user_cache, transactional_db, redis_conn):
    customer = Customer.objects.create_user(username="carol", password="pw")
    _instance, token = AuthToken.objects.create(user=customer)
    cached(token)
    customer.loyalty = 3
    customer.save(update_fields=["loyalty"])
    assert row_cached(redis_conn, customer)


def test_a_process_without_user_cache_revokes_even_with_its_breaker_open(settings, make_token, user, proxy, via):
    """A mixed fleet: the process without USER_CACHE had a failed lookup (its breaker is open)
    but Redis is back: its user save must still reach Redis."""
    via(proxy.url, cooldown=60)
    token = make_token(write_through=True)
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "USER_CACHE": True}
    cached(token)  # a process with USER_CACHE caches the row
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "USER_CACHE": False}  # one without
    proxy.cut()
    assert accepted(token)  # a failed lookup opens its breaker
    proxy.heal()
    user.is_active = False
    user.save()
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "USER_CACHE": True}
    assert not accepted(token)


def test_lifting_a_tombstone_never_lifts_another_writers(user, redis_conn):
    """Two saves of one user in flight, even within the same millisecond: the first to commit
    lifts its own tombstone only; the other still stops a fill of the row it hasn't
    committed yet."""
    client = cache.get_client()
    _n, first = client.revoke([], user_rows=[user.pk], tombstone_ms=60_000)
    _n, second = client.revoke([], user_rows=[user.pk], tombstone_ms=60_000)
    assert first != second
    client.revoke([], user_rows=[user.pk], tombstone_ms=0, lift_tombstone=first)  # the first commits
    _row, generation = client.lookup_user(user.pk, create=True)
    query = users.row_query(type(user), "default")
    values = query.cached_values(query.fetch(user.pk))
    assert not client.fill_user(user.pk, generation, cache.to_us(timezone.now()) + 60_000_000, values, 120_000)


@pytest.fixture
def restore_user_sequence(transactional_db):
    """SQLite's AUTOINCREMENT would hand 2^60 + 2 to every later test's user."""
    yield
    if connection.vendor == "sqlite":
        with connection.cursor() as cursor:
            cursor.execute("DELETE FROM sqlite_sequence WHERE name = 'auth_user'")


@pytest.mark.skipif(connection.vendor != "sqlite", reason="auth_user.id is a 32-bit integer on PostgreSQL")
def test_a_snowflake_primary_key_is_served_from_the_row(user_cache, restore_user_sequence, django_assert_num_queries):
    big = get_user_model().objects.create_user(id=2**60 + 1, username="snow", password="pw")
    _instance, token = AuthToken.objects.create(user=big)
    cached(token)
    with django_assert_num_queries(0):
        assert accepted(token)
