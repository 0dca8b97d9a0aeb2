"""Across processes: once a revocation has returned in one process, no other process accepts
the token, though each of them had it cached (the claim is "in any process", not "in this one").

CLOCK_MONOTONIC is system-wide on Linux, so instants compare across processes."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest
from django.db import connections
from knox.models import AuthToken

from tests.helpers import accepted

WORKERS = 3


def worker(tokens: list[str], stop_at: float, queue) -> None:
    connections.close_all()  # never share the parent's database connection
    seen: list[tuple[str, float, bool]] = []
    try:
        while time.monotonic() < stop_at:
            for token in tokens:
                started = time.monotonic()
                seen.append((token, started, accepted(token)))
        queue.put(("ok", seen))
    except BaseException as exc:
        queue.put(("error", repr(exc)))
    finally:
        connections.close_all()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_no_process_accepts_a_token_after_its_revocation_returned(user):
    tokens = [AuthToken.objects.create(user=user)[1] for _ in range(6)]
    for token in tokens:
        assert accepted(token)  # every process will find these cached
    connections.close_all()

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    stop_at = time.monotonic() + 2.5
    children = [ctx.Process(target=worker, args=(tokens, stop_at, queue)) for _ in range(WORKERS)]
    for child in children:
        child.start()
    revoked_at: dict[str, float] = {}
    time.sleep(0.3)
    for token in tokens[:4]:
        AuthToken.objects.filter(token_key=token[:15]).delete()
        revoked_at[token] = time.monotonic()  # the revocation has returned
        time.sleep(0.3)
    results = [queue.get(timeout=30) for _ in children]
    for child in children:
        child.join(30)

    violations = []
    accepted_total = 0
    for status, seen in results:
        assert status == "ok", seen
        for token, started, ok in seen:
            accepted_total += ok
            if ok and token in revoked_at and started > revoked_at[token]:
                violations.append((token[:8], started - revoked_at[token]))
    assert violations == []
    assert accepted_total > 50  # the workers really were authenticating meanwhile
    for token in tokens[4:]:
        assert accepted(token)
