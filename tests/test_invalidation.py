"""Every ORM path by which a token leaves (or changes in) the database revokes it in Redis:
deletes and edits, through the model, a proxy model, a queryset, a cascade or the admin."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone
from knox.models import AuthToken
from rest_framework.exceptions import AuthenticationFailed

import knox_redis
from knox_redis import cache
from knox_redis.auth import TokenAuthentication
from tests.conftest import auth_header
from tests.helpers import accepted, authenticate, record_exists, whoami
from tests.testapp.models import ProxyToken


def cached_records(redis_conn) -> int:
    total = 0
    for key in redis_conn.scan_iter("knox:token:*"):
        total += sum(1 for f in redis_conn.hkeys(key) if f.startswith(b"r:"))
    return total


@pytest.fixture
def warm(client):
    def warm(*tokens):
        for t in tokens:
            assert client.get("/api/whoami/", **auth_header(t)).status_code == 200

    return warm


def test_instance_delete(client, make_token, warm, redis_conn):
    token = make_token()
    warm(token)
    assert cached_records(redis_conn) == 1
    AuthToken.objects.get().delete()
    assert cached_records(redis_conn) == 0
    assert client.get("/api/whoami/", **auth_header(token)).status_code == 401


def test_queryset_delete(client, make_token, warm, redis_conn, user):
    tokens = [make_token() for _ in range(5)]
    warm(*tokens)
    assert cached_records(redis_conn) == 5
    AuthToken.objects.filter(user=user).delete()
    assert cached_records(redis_conn) == 0
    for t in tokens:
        assert client.get("/api/whoami/", **auth_header(t)).status_code == 401


def test_cascade_from_user_delete(client, make_token, warm, redis_conn, user):
    tokens = [make_token() for _ in range(3)]
    warm(*tokens)
    user.delete()
    assert cached_records(redis_conn) == 0
    for t in tokens:
        assert client.get("/api/whoami/", **auth_header(t)).status_code == 401


def test_admin_delete(client, make_token, warm, redis_conn, django_user_model):
    token = make_token()
    warm(token)
    admin = django_user_model.objects.create_superuser("root", "root@example.com", "pw")
    client.force_login(admin)
    digest = AuthToken.objects.get().digest
    response = client.post(f"/admin/knox/authtoken/{digest}/delete/", {"post": "yes"})
    assert response.status_code == 302, response.content[:500]
    client.logout()
    assert not AuthToken.objects.filter(digest=digest).exists()
    assert cached_records(redis_conn) == 0
    assert client.get("/api/whoami/", **auth_header(token)).status_code == 401


def test_edit_drops_cached_record(client, make_token, warm):
    token = make_token()
    warm(token)
    row = AuthToken.objects.get()
    row.expiry = timezone.now() - timedelta(seconds=1)
    row.save()
    assert client.get("/api/whoami/", **auth_header(token)).status_code == 401


def test_raw_delete_then_public_invalidate_token(client, make_token, warm):
    token = make_token()
    warm(token)
    row = AuthToken.objects.get()
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM knox_authtoken")
    # The cache can't know about raw SQL until told (or until MAX_CACHE_TTL).
    assert client.get("/api/whoami/", **auth_header(token)).status_code == 200
    knox_redis.invalidate_token(row)
    assert client.get("/api/whoami/", **auth_header(token)).status_code == 401


def test_raw_delete_then_public_invalidate_user_tokens(client, make_token, warm, user):
    tokens = [make_token() for _ in range(3)]
    warm(*tokens)
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM knox_authtoken")
    knox_redis.invalidate_user_tokens(user.pk)
    for t in tokens:
        assert client.get("/api/whoami/", **auth_header(t)).status_code == 401


def test_revocation_runs_with_cache_disabled(client, make_token, warm, redis_conn, settings):
    token = make_token()
    warm(token)  # another process of the fleet cached it
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "CACHE_ENABLED": False}
    AuthToken.objects.get().delete()
    assert cached_records(redis_conn) == 0
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "CACHE_ENABLED": True}
    assert client.get("/api/whoami/", **auth_header(token)).status_code == 401


def test_deactivated_user_rejected_on_next_request(client, make_token, warm, user):
    token = make_token()
    warm(token, token)
    user.is_active = False
    user.save()
    response = client.get("/api/whoami/", **auth_header(token))
    assert response.status_code == 401
    assert response.json() == {"detail": "User inactive or deleted."}


def test_user_index_is_pruned_on_single_revocation(client, make_token, warm, redis_conn, user):
    a, b = make_token(), make_token()
    warm(a, b)
    assert redis_conn.hlen(f"knox:user:{user.pk}:ix") == 2
    AuthToken.objects.get(token_key=a[:15]).delete()
    assert redis_conn.hlen(f"knox:user:{user.pk}:ix") == 1


def test_every_key_has_a_ttl(client, make_token, warm, redis_conn):
    warm(make_token(), make_token(expiry=None))
    AuthToken.objects.first().delete()
    keys = list(redis_conn.scan_iter("knox:*"))
    assert keys
    for key in keys:
        assert redis_conn.pttl(key) > 0, key


def test_ttl_never_exceeds_expiry(client, make_token, warm, redis_conn):
    token = make_token(expiry=timedelta(seconds=30))
    warm(token)
    assert 0 < redis_conn.pttl(f"knox:token:{token[:15]}") <= 60_000  # the 60 s lease at most


def test_clear_expired_command(client, make_token, warm, user, redis_conn):
    from io import StringIO

    from django.core.management import call_command

    live = make_token()
    warm(live)
    for _ in range(7):
        make_token(expiry=timedelta(seconds=-1))
    out = StringIO()
    call_command("knox_clear_expired", "--batch-size", "3", stdout=out)
    assert "Deleted 7 expired token(s)." in out.getvalue()
    assert AuthToken.objects.filter(user=user).count() == 1
    assert client.get("/api/whoami/", **auth_header(live)).status_code == 200


def test_delete_through_a_proxy_model_revokes(client, make_token, redis_conn):
    token = make_token()
    assert whoami(client, token) == 200
    assert record_exists(redis_conn, token)
    ProxyToken.objects.all().delete()
    assert not AuthToken.objects.exists()
    assert whoami(client, token) == 401


def test_edit_through_a_proxy_model_revokes(client, make_token):
    token = make_token()
    assert whoami(client, token) == 200
    row = ProxyToken.objects.get()
    row.expiry = timezone.now() - timedelta(seconds=1)
    row.save()
    assert whoami(client, token) == 401


def test_save_of_new_instance_with_existing_pk_revokes(client, make_token):
    """A save of an instance built afresh (_state.adding) over an existing primary key is an
    UPDATE of that row, so it revokes like any other edit."""
    token = make_token()
    assert whoami(client, token) == 200
    row = AuthToken.objects.get()
    AuthToken(
        digest=row.digest,
        token_key=row.token_key,
        user_id=row.user_id,
        created=row.created,
        expiry=timezone.now() - timedelta(seconds=1),
    ).save()
    assert AuthToken.objects.get().expiry < timezone.now()  # the save was an UPDATE
    assert whoami(client, token) == 401


def test_token_key_edit_revokes_the_old_record(client, make_token):
    """Editing token_key (the admin form exposes it) revokes the record cached under the old
    key, not only under the new one."""
    token = make_token()
    assert whoami(client, token) == 200
    row = AuthToken.objects.get()
    row.token_key = "zzzzzzzzzzzzzzz"
    row.save()
    # knox: token_key no longer matches, the token is unusable
    assert whoami(client, token) == 401


class ExpiringAuth(TokenAuthentication):
    """Forces a re-login from validate_user by expiring the token being authenticated."""

    def validate_user(self, auth_token):
        if getattr(auth_token.user, "last_name", "") == "force-logout":
            auth_token.expiry = timezone.now() - timedelta(seconds=1)
            auth_token.save(update_fields=["expiry"])
            raise AuthenticationFailed("re-login required")
        return super().validate_user(auth_token)


def test_edit_of_the_token_inside_validate_user_revokes(make_token, user):
    """validate_user runs inside the authentication of the very token it edits: that edit is
    not taken for the authentication's own refresh, and revokes the record."""
    token = make_token()
    assert accepted(token, ExpiringAuth)
    assert accepted(token, ExpiringAuth)  # cached
    user.last_name = "force-logout"
    user.save()
    assert not accepted(token, ExpiringAuth)  # expires the token (DB)
    user.last_name = ""
    user.save()
    assert AuthToken.objects.get().expiry < timezone.now()
    assert not accepted(token, ExpiringAuth), "expired in DB, still accepted from cache"


def test_saving_fields_the_record_doesnt_hold_keeps_it_cached(make_token, redis_conn):
    """Only a save that may change what the record holds revokes it."""
    token = make_token()
    authenticate(token)
    row = AuthToken.objects.get()
    row.save(update_fields=[])  # e.g. a custom model's last_used: nothing the record holds
    assert record_exists(redis_conn, token)
    row.save(update_fields=["expiry"])
    assert not record_exists(redis_conn, token)


def test_row_with_non_hex_digest_does_not_block_deleting_its_user(user):
    """A row whose digest isn't 32+ hex characters (imported, hand-made) can never be
    presented, so there is nothing of it to revoke: it, and its user (cascade), are deleted
    like any other."""
    AuthToken(digest="legacy-import-1", token_key="legacy", user=user).save()
    user.delete()
    assert not AuthToken.objects.exists()


def test_revoking_all_tokens_of_a_user_who_has_none(user, redis_conn):
    """What logoutall runs, for a user without tokens: nothing to revoke, and no error."""
    with cache.revoking_all_tokens_of(user):
        pass
