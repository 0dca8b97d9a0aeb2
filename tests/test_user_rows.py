"""The user row USER_CACHE will keep: each column as the database driver returned it, signed
for the user, and the user rebuilt from it as a query builds it (converters, from_db), with
the password and last_login deferred. On the real backends (SQLite, PostgreSQL)."""

from __future__ import annotations

import datetime
import decimal
import uuid

import pytest
from django.contrib.auth import get_user_model
from django.contrib.postgres.fields import ArrayField
from django.db import connection, models
from django.test.utils import isolate_apps
from django.utils import timezone

from knox_redis import cache, users


class ReversedTextField(models.TextField):
    """Stands for an encrypted field: what the database holds is not what the app reads."""

    def get_db_prep_value(self, value, connection, prepared=False):
        value = super().get_db_prep_value(value, connection, prepared)
        return None if value is None else "enc:" + value[::-1]

    def from_db_value(self, value, expression, connection):
        return None if value is None else value.removeprefix("enc:")[::-1]


def round_trip(instance):
    model = type(instance)
    fetched, values, _problem = users.fetch_user(model, instance.pk, "default")
    data = cache.encode_user_row(instance.pk, timezone.now(), values)
    decoded = cache.decode_user_row(instance.pk, data)
    assert decoded is not None
    _fresh_until, values_back = decoded
    return data, fetched, users.build_user(model, values_back, "default", prepared={})


def test_the_stock_user_round_trips_with_its_password_deferred(user, django_assert_num_queries):
    user.first_name, user.is_staff = "Alice", True
    user.save()
    user.refresh_from_db()
    data, fetched, rebuilt = round_trip(user)
    assert user.password.encode() not in data  # the hash never leaves the database
    for field in users.cached_fields(type(user)):
        assert getattr(rebuilt, field.attname) == getattr(user, field.attname) == getattr(fetched, field.attname)
    assert rebuilt.get_deferred_fields() == {"password", "last_login"}
    assert rebuilt._state.db == "default"
    assert not rebuilt._state.adding
    with django_assert_num_queries(1):
        assert rebuilt.check_password("pw")  # loaded when touched
    assert users.fields_that_cant_round_trip(user) == []
    assert users.unsupported_fields(get_user_model()) == []


@pytest.fixture
def everything_model(transactional_db):
    with isolate_apps("tests.testapp"):

        class Everything(models.Model):  # noqa: DJ008  (a test table)
            secret = ReversedTextField()
            amount = models.DecimalField(max_digits=10, decimal_places=3)
            when = models.DateTimeField()
            day = models.DateField()
            at = models.TimeField()
            span = models.DurationField()
            ident = models.UUIDField()
            blob = models.BinaryField()
            data = models.JSONField()
            ratio = models.FloatField()
            big = models.BigIntegerField()
            flag = models.BooleanField(null=True)
            note = models.CharField(max_length=20, null=True)  # noqa: DJ001  (NULL must round-trip)
            ip = models.GenericIPAddressField()

            class Meta:
                app_label = "testapp"

        with connection.schema_editor() as editor:
            editor.create_model(Everything)
        yield Everything
        with connection.schema_editor() as editor:
            editor.delete_model(Everything)


def test_every_common_column_type_round_trips(everything_model):
    row = everything_model.objects.create(
        secret="the plaintext",
        amount=decimal.Decimal("12.345"),
        when=datetime.datetime(2026, 11, 25, 12, 30, 45, 123456, tzinfo=datetime.timezone.utc),
        day=datetime.date(2026, 11, 25),
        at=datetime.time(12, 30, 45, 123456),
        span=datetime.timedelta(days=2, microseconds=9),
        ident=uuid.uuid4(),
        blob=b"\x00\xffbinary",
        data={"nested": [1, "two", None]},
        ratio=0.125,
        big=-(2**62),
        flag=None,
        note=None,
        ip="2001:db8::1",
    )
    data, fetched, rebuilt = round_trip(row)
    assert b"the plaintext" not in data
    assert b"txetnialp eht" in data  # stored as the database holds it: still "encrypted"
    for field in everything_model._meta.concrete_fields:
        back, direct = getattr(rebuilt, field.attname), getattr(fetched, field.attname)
        if isinstance(back, memoryview):
            back, direct = bytes(back), bytes(direct)
        assert back == direct, field.name
        assert type(back) is type(direct), field.name
    assert rebuilt.secret == "the plaintext"
    assert users.fields_that_cant_round_trip(row) == []
    assert users.unsupported_fields(everything_model) == []


def test_a_row_is_bound_to_its_user(user, django_user_model):
    other = django_user_model.objects.create_user(username="bob")
    values = users.fetch_user(type(user), user.pk, "default").values
    data = cache.encode_user_row(user.pk, timezone.now(), values)
    assert cache.decode_user_row(other.pk, data) is None
    assert cache.decode_user_row(user.pk, data[:-1] + bytes([data[-1] ^ 1])) is None
    assert cache.decode_user_row(user.pk, b"garbage") is None


def test_a_missing_user_is_none(transactional_db):
    assert users.fetch_user(get_user_model(), 12345, "default") is None


@isolate_apps("tests.testapp")
def test_column_types_a_row_cant_hold_are_named():
    class Tagged(models.Model):  # noqa: DJ008  (a test model)
        fine = models.CharField(max_length=10)
        tags = ArrayField(models.CharField(max_length=10))

        class Meta:
            app_label = "testapp"

    assert [p.field.name for p in users.unsupported_fields(Tagged)] == ["tags"]


def test_a_value_of_a_type_the_row_cant_hold_is_refused():
    with pytest.raises(users.UncacheableValue):
        users.to_primitive(object())
    with pytest.raises(users.UncacheableValue):
        users.to_primitive(["a", "list"])


def test_load_user_is_base_manager_get_in_one_precompiled_query(user, django_assert_num_queries):
    """What a cache hit runs without USER_CACHE: the same columns and values as the ORM's
    `_base_manager.get(pk=...)`, nothing deferred, and None for a user that is gone."""
    model = type(user)
    expected = model._base_manager.get(pk=user.pk)
    with django_assert_num_queries(1):
        loaded = users.load_user(model, user.pk, "default")
    assert loaded.get_deferred_fields() == set()
    for field in model._meta.concrete_fields:
        assert getattr(loaded, field.attname) == getattr(expected, field.attname), field.name
    assert loaded._state.db == "default"
    assert not loaded._state.adding
    assert users.load_user(model, user.pk + 1000, "default") is None


def test_row_queries_keep_no_connection_alive(user):
    """Compiled SQL is shared; converters live on each connection object, and die with it."""
    import gc
    import threading
    import weakref

    from django.db import connections

    refs = []
    users.row_query.cache_clear()

    def hit() -> None:
        users.load_user(type(user), user.pk, "default")
        refs.append(weakref.ref(connections["default"]))
        connections["default"].close()

    for _ in range(5):
        thread = threading.Thread(target=hit)
        thread.start()
        thread.join()
    gc.collect()
    assert all(ref() is None for ref in refs)
    assert users.row_query.cache_info().currsize == 1  # one compiled query for every thread
