"""Fork safety: connections opened before a fork (gunicorn --preload) are never used by a child.

Parent and children hammer lookups for different tokens at the same time; if a child reused
an inherited socket, replies would cross between processes and users would be mixed up."""

from __future__ import annotations

import multiprocessing
import os

import pytest
from django.db import connections
from knox.models import AuthToken
from rest_framework.test import APIRequestFactory

from knox_redis import cache
from knox_redis.auth import TokenAuthentication
from tests.conftest import auth_header

factory = APIRequestFactory()


def who(token: str) -> str:
    user, _ = TokenAuthentication().authenticate(factory.get("/", **auth_header(token)))
    return user.get_username()


def child_work(tokens: dict[str, str], rounds: int, queue) -> None:
    connections.close_all()  # the database connection is the parent's too
    try:
        wrong = sum(1 for _ in range(rounds) for name, token in tokens.items() if who(token) != name)
        queue.put((os.getpid(), wrong, cache.get_client().stats()["hits"]))
    except BaseException as exc:
        queue.put((os.getpid(), repr(exc), 0))
    finally:
        connections.close_all()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_children_never_share_the_parents_connections(transactional_db, django_user_model):
    tokens = {}
    expected = {}  # digest -> (token_key, user pk): what the parent checks against
    for i in range(6):
        user = django_user_model.objects.create_user(username=f"user{i}")
        row, token = AuthToken.objects.create(user=user)
        tokens[user.username] = token
        expected[row.digest] = (row.token_key, user.pk)
    for name, token in tokens.items():  # the parent fills the cache and pools connections
        assert who(token) == name
        assert who(token) == name
    assert cache.get_client().stats()["idle_connections"] >= 1
    connections.close_all()  # SQLite and fork don't mix; the Redis sockets are under test

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    children = [ctx.Process(target=child_work, args=(tokens, 40, queue)) for _ in range(3)]
    for child in children:
        child.start()
    # Meanwhile the parent keeps using its pooled connections.
    parent_wrong = 0
    for _ in range(40):
        for digest, (token_key, user_pk) in expected.items():
            record, *_ = cache.get_client().lookup(token_key, digest)
            parent_wrong += record is None or record[0] != user_pk
    results = [queue.get(timeout=60) for _ in children]
    for child in children:
        child.join(30)
        assert child.exitcode == 0
    assert parent_wrong == 0
    for pid, wrong, hits in results:
        assert wrong == 0, (pid, wrong)
        assert hits > 0, "children were served from Redis"
