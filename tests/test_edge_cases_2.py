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
