"""System checks for settings that can't work."""

from __future__ import annotations

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError

from knox_redis.checks import check_token_length


def test_knox_tokens_longer_than_knox_redis_accepts_are_an_error(settings):
    settings.REST_KNOX = {"AUTH_TOKEN_CHARACTER_LENGTH": 2048}
    (error,) = check_token_length()
    assert error.id == "knox_redis.E002"
    assert "2048" in error.msg
    assert error.hint
    with pytest.raises(SystemCheckError, match=r"knox_redis\.E002"):
        call_command("check")


def test_the_longest_tokens_knox_redis_accepts_pass(settings):
    settings.REST_KNOX = {"AUTH_TOKEN_CHARACTER_LENGTH": 1024 - 10, "TOKEN_PREFIX": "p" * 10}
    assert check_token_length() == []
    settings.REST_KNOX = {"AUTH_TOKEN_CHARACTER_LENGTH": 1024 - 9, "TOKEN_PREFIX": "p" * 10}
    # 1015 // 2 bytes of hex: 1014 characters, plus the prefix: still 1024.
    assert check_token_length() == []
    settings.REST_KNOX = {"AUTH_TOKEN_CHARACTER_LENGTH": 1024 - 8, "TOKEN_PREFIX": "p" * 10}
    assert [e.id for e in check_token_length()] == ["knox_redis.E002"]
