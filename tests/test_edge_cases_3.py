"""Holes and README mismatches found in the third review, each pinned by its test."""

from __future__ import annotations

from django.db import connection
from django.test.utils import CaptureQueriesContext


def sql_of(fn):
    with CaptureQueriesContext(connection) as ctx:
        fn()
    return [q["sql"] for q in ctx.captured_queries]
