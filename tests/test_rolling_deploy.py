"""A rolling deploy: the previous release's code (built by tests/previous_release.py, run in
its own process) and this release's, side by side on one Redis and one database. A
revocation by either stops the token in both; each reads the other's records as a miss,
never as an error."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection
from knox.models import AuthToken

import knox_redis
from knox_redis import cache
from tests import previous_release
from tests.helpers import accepted, record_exists

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(previous_release.available() is not None, reason=str(previous_release.available())),
]


class OldProcess:
    def __init__(self, redis_url: str) -> None:
        database = {**settings.DATABASES["default"], "NAME": connection.settings_dict["NAME"]}
        database.pop("TEST", None)
        self.proc = subprocess.Popen(
            [
                str(previous_release.PYTHON),
                str(Path(__file__).with_name("previous_release_driver.py")),
                json.dumps({"database": database, "redis_url": redis_url}),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd="/",
        )
        assert self.proc.stdout.readline().strip() == "ready"

    def __call__(self, command: str) -> str:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        assert not answer.startswith("error"), answer
        return answer

    def accepts(self, token: str) -> bool:
        return self(f"auth {token}").startswith("200")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


@pytest.fixture
def old(redis_server, transactional_db):
    process = OldProcess(redis_server.url)
    yield process
    process.close()


def test_a_logout_by_the_old_release_stops_the_token_in_the_new(old, make_token):
    token = make_token()
    assert accepted(token)
    assert accepted(token)
    assert old(f"delete {token}") == "deleted 1"
    assert not accepted(token)


def test_a_logout_by_the_new_release_stops_the_token_in_the_old(old, make_token, redis_conn):
    token = make_token()
    assert old.accepts(token)
    assert old.accepts(token)
    assert record_exists(redis_conn, token)
    AuthToken.objects.filter(token_key=token[:15]).delete()
    assert not old.accepts(token)


def test_both_releases_serving_one_token_read_each_others_records_as_misses(old, make_token):
    token = make_token()
    for _ in range(3):
        assert accepted(token)
        assert old.accepts(token)
    assert cache.get_client().stats()["undecodable"] >= 1  # the old release's JSON records
    assert old(f"delete {token}") == "deleted 1"
    assert not accepted(token)
    assert not old.accepts(token)


def test_logoutall_by_either_release_stops_tokens_the_other_cached(old, make_token, user, client):
    from tests.conftest import auth_header

    mine, theirs = make_token(), make_token()
    assert accepted(mine)
    assert accepted(mine)
    assert old.accepts(theirs)
    assert old.accepts(theirs)
    assert old("logoutall alice") == "deleted 2"
    assert not accepted(mine)
    assert not old.accepts(theirs)

    mine, theirs = make_token(), make_token()
    assert accepted(mine)
    assert accepted(mine)
    assert old.accepts(theirs)
    assert old.accepts(theirs)
    assert client.post("/api/logoutall/", **auth_header(mine)).status_code == 204
    assert not accepted(mine)
    assert not old.accepts(theirs)
    assert not old.accepts(mine)
    assert not accepted(theirs)


def test_invalidate_user_tokens_reaches_what_only_the_old_index_remembers(old, make_token, user):
    token = make_token()
    assert old.accepts(token)
    assert old.accepts(token)
    AuthToken.objects.filter(user=user)._raw_delete(using="default")  # behind Django's back
    assert old.accepts(token)  # the stale record: what invalidate_user_tokens is for
    knox_redis.invalidate_user_tokens(user)
    assert not old.accepts(token)
