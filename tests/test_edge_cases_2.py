"""Holes found in the second review, each pinned by the test that first showed it (the first
review's are in test_edge_cases.py)."""

from __future__ import annotations

from knox.models import AuthToken

from tests.conftest import auth_header


def get(client, token) -> int:
    return client.get("/api/whoami/", **auth_header(token)).status_code


def record_field(token):
    row = AuthToken.objects.get(token_key=token[:15])
    return f"knox:token:{token[:15]}", f"r:{row.digest[:32]}"


# 6. A db number beyond i64 passed `manage.py check`; logout then raised OverflowError (500).
def test_bad_db_is_caught_by_check_and_never_a_500(client, make_token, settings):
    from knox_redis.checks import check_settings

    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "REDIS_URL": "redis://127.0.0.1:6379/9223372036854775808"}
    errors = check_settings()
    assert [e.id for e in errors] == ["knox_redis.E001"]
    # A process started without running checks (gunicorn doesn't) still never answers 500.
    token = make_token()
    client.raise_request_exception = False
    assert get(client, token) == 200  # lookups fail open
    assert client.post("/api/logout/", **auth_header(token)).status_code == 503  # revocations fail closed
