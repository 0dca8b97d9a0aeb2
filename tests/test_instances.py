"""A hit builds the user and the token as a query does (knox_redis.instances): what it builds
fast must be indistinguishable from `Model.from_db`, and anything that could tell the two
apart (a receiver, an `__init__` or `from_db` of the model's own) gets `from_db` itself. Runs
on every Django version CI runs."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.db import models
from django.db.models.signals import post_init, pre_init
from django.test.utils import isolate_apps
from knox.models import AuthToken

from knox_redis import instances
from knox_redis.auth import TOKEN_COLUMNS

USER_COLUMNS = ("id", "is_superuser", "username", "first_name", "last_name", "email", "is_staff", "is_active")
WHEN = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)


def user_values() -> tuple:
    return (7, False, "alice", "Alice", "Liddell", "alice@example.com", False, True)


def same_instance(fast, slow) -> None:
    assert type(fast) is type(slow)
    assert {k: v for k, v in vars(fast).items() if k != "_state"} == {
        k: v for k, v in vars(slow).items() if k != "_state"
    }
    # fields_cache is made on first use (by setting a foreign key's column, in from_db).
    assert fast._state.fields_cache == slow._state.fields_cache == {}
    assert vars(fast.__dict__["_state"]) == vars(slow.__dict__["_state"])
    assert fast._state.adding is False
    assert fast._state.db == "other"
    assert fast.get_deferred_fields() == slow.get_deferred_fields()
    assert fast == slow


def test_a_user_is_built_as_from_db_builds_it():
    build = instances.builder(User, USER_COLUMNS)
    assert build.plain
    fast = build("other", user_values())
    same_instance(fast, User.from_db("other", list(USER_COLUMNS), list(user_values())))
    assert fast.get_deferred_fields() == {"password", "last_login", "date_joined"}


def test_a_token_is_built_as_from_db_builds_it():
    values = ("d" * 128, "abcdefgh", 7, WHEN, None)
    build = instances.builder(AuthToken, TOKEN_COLUMNS)
    assert build.plain
    same_instance(build("other", values), AuthToken.from_db("other", list(TOKEN_COLUMNS), list(values)))


def test_each_call_builds_a_new_instance():
    build = instances.builder(User, USER_COLUMNS)
    first, second = build("other", user_values()), build("other", user_values())
    first.first_name = "changed"
    assert second.first_name == "Alice"
    assert first._state is not second._state


@pytest.mark.parametrize("signal", [pre_init, post_init])
def test_a_receiver_gets_its_signal(signal):
    seen = []

    def receiver(sender, **kwargs):
        seen.append(sender)

    build = instances.builder(User, USER_COLUMNS)
    build("other", user_values())  # the sender's cache now says "no receivers"
    signal.connect(receiver, sender=User)
    try:
        user = build("other", user_values())
    finally:
        signal.disconnect(receiver, sender=User)
    assert seen == [User]
    assert user.username == "alice"
    assert user._state.db == "other"
    build("other", user_values())
    assert seen == [User]  # disconnected: the fast way again


def test_a_receiver_for_another_model_changes_nothing():
    def receiver(sender, **kwargs):
        raise AssertionError("not this sender")

    post_init.connect(receiver, sender=AuthToken)
    try:
        same_instance(
            instances.builder(User, USER_COLUMNS)("other", user_values()),
            User.from_db("other", list(USER_COLUMNS), list(user_values())),
        )
    finally:
        post_init.disconnect(receiver, sender=AuthToken)


@isolate_apps("tests.testapp")
def test_a_model_with_its_own_init_or_from_db_or_attributes_gets_from_db():
    class OwnInit(models.Model):  # noqa: DJ008
        name = models.CharField(max_length=10)

        class Meta:
            app_label = "testapp"

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.seen = True

    class OwnFromDb(models.Model):  # noqa: DJ008
        name = models.CharField(max_length=10)

        class Meta:
            app_label = "testapp"

        @classmethod
        def from_db(cls, db, field_names, values):
            instance = super().from_db(db, field_names, values)
            instance.seen = True
            return instance

    class Mixin:
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.seen = True

    class MixedIn(models.Model, Mixin):  # noqa: DJ008
        name = models.CharField(max_length=10)

        class Meta:
            app_label = "testapp"

    class Uppercase:
        def __set__(self, instance, value):
            instance.__dict__["name"] = value.upper()

        def __get__(self, instance, owner=None):
            return self if instance is None else instance.__dict__["name"]

    class OwnAttribute(models.Model):  # noqa: DJ008
        name = models.CharField(max_length=10)

        class Meta:
            app_label = "testapp"

    OwnAttribute.name = Uppercase()

    for model in (OwnInit, OwnFromDb, MixedIn):
        build = instances.builder(model, ("id", "name"))
        assert not build.plain
        assert build("default", (1, "x")).seen
    build = instances.builder(OwnAttribute, ("id", "name"))
    assert not build.plain
    assert build("default", (1, "x")).name == "X"


@pytest.mark.django_db
def test_a_hit_returns_the_user_and_token_a_query_returns(make_token, user):
    from tests.helpers import authenticate

    token = make_token(write_through=True)
    authenticate(token)  # the user's row cached
    got_user, got_token = authenticate(token)
    assert got_user == get_user_model().objects.get(pk=user.pk)
    assert got_token.user is got_user
    assert got_token == AuthToken.objects.get(token_key=token[:15])
    assert got_token._state.adding is False
    assert got_user._state.adding is False


CREATED = datetime(2026, 1, 1, tzinfo=timezone.utc)
EXPIRY = datetime(2026, 1, 2, tzinfo=timezone.utc)


def project_wide_receiver(sender, **kwargs):
    pass


@pytest.mark.parametrize("redefined", ["created", "user"])
@pytest.mark.parametrize("receiver", [False, True])
@isolate_apps("tests.testapp")
def test_a_token_model_that_redefines_a_knox_field_is_built_as_a_query_builds_it(redefined, receiver):
    """Redefining an inherited field moves it last in the model's field order, which is the
    order from_db takes values in (the way a receiver anywhere in the project sends hits)."""
    from django.conf import settings
    from knox.models import AbstractAuthToken

    attrs = {"__module__": __name__, "Meta": type("Meta", (), {"app_label": "testapp"})}
    if redefined == "created":
        attrs["created"] = models.DateTimeField(auto_now_add=True, db_index=True)
    else:
        attrs["user"] = models.ForeignKey(settings.AUTH_USER_MODEL, related_name="tokens", on_delete=models.CASCADE)
    model = type(f"Redefined{redefined.title()}Token", (AbstractAuthToken,), attrs)
    assert [f.attname for f in model._meta.concrete_fields] != list(TOKEN_COLUMNS)
    user = User(pk=7, username="alice")
    user._state.adding, user._state.db = False, "default"
    if receiver:
        post_init.connect(project_wide_receiver)
    try:
        token = instances.builder(model, TOKEN_COLUMNS)("default", ("d" * 128, "abcdefgh", user.pk, CREATED, EXPIRY))
        instances.set_related(token, "user", user)
    finally:
        post_init.disconnect(project_wide_receiver)
    assert (token.created, token.expiry, token.user_id) == (CREATED, EXPIRY, 7)
    assert token.user is user


def test_set_related_on_a_column_holding_another_key_sets_it_as_the_descriptor_does():
    token = instances.builder(AuthToken, TOKEN_COLUMNS)("default", ("d" * 128, "abcdefgh", 8, WHEN, None))
    user = User(pk=7, username="alice")
    user._state.adding, user._state.db = False, "default"
    instances.set_related(token, "user", user)
    assert token.user_id == 7
    assert token.user is user
