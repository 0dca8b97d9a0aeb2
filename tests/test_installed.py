"""The guard CI relies on to know it tested the installed wheel (tests/installed.py)."""

from __future__ import annotations

import sys

import pytest

from knox_redis import _knox_redis
from tests import installed


def test_another_virtualenv_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(installed.ENV, str(tmp_path))
    with pytest.raises(RuntimeError, match=installed.ENV) as raised:
        installed.check()
    message = str(raised.value)
    assert f"not from {tmp_path.resolve()}" in message
    assert "knox_redis._knox_redis is imported from" in message


def test_source_tree_is_refused_as_installed(monkeypatch):
    """As `maturin develop` leaves things (python/ on sys.path), even the right virtualenv fails."""
    monkeypatch.setattr(sys, "path", [*sys.path, str(installed.SOURCE)])
    found = installed.problems(sys.prefix)
    assert any("on sys.path" in p for p in found), found


def test_unset_means_no_expectation(monkeypatch):
    monkeypatch.delenv(installed.ENV, raising=False)
    assert installed.check() == f"knox_redis: {_knox_redis.__file__}"
