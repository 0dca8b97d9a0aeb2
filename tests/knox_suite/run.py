"""Fetch the sdist of the installed django-rest-knox, and run its tests with knox_redis.

Usage: python -m tests.knox_suite.run [pytest args...]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
BUILD = ROOT / "build" / "knox-suite"


def knox_tests() -> Path:
    knox_version = version("django-rest-knox")
    target = BUILD / f"knox-{knox_version}-tests"
    if target.exists():
        return target
    BUILD.mkdir(parents=True, exist_ok=True)
    sdist = BUILD / f"django_rest_knox-{knox_version}.tar.gz"
    if not sdist.exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--dest",
                str(BUILD),
                f"django-rest-knox=={knox_version}",
            ],
            check=True,
        )
    staging = BUILD / "staging"
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if "/tests/" in m.name and m.name.endswith(".py")]
        archive.extractall(staging, members=members, filter="data")
    extracted = next(staging.glob("*/tests"))
    extracted.rename(target)
    return target


# In transactional mode only (all of them pass as written, where TestCase never commits and
# so nothing is cached):
# - outside TestCase's wrapping transaction each delete of an expired sibling is
#   BEGIN/DELETE/COMMIT (Django can't use its signal-less fast delete once knox_redis listens
#   to pre_delete);
# - the login's write-through makes the first request with a new token a cache hit: 1 query
#   (the user), not knox's 2; and a hit doesn't read the user's other tokens, so knox's
#   cleanup of expired siblings (and its token_expired signal for them) waits for a miss, for
#   such a token to be used, or for `knox_clear_expired` (README: "Where knox's expired-token
#   cleanup happens now").
TRANSACTIONAL_DESELECT = [
    "test_auth.py::CleanupTokenTestCase::test_cleanup_query_count_with_expired_siblings",
    "test_views.py::TokenAuthenticationTestCase::test_token_auth_n_plus_one",
    "test_auth.py::CleanupTokenTestCase::test_cleanup_deletes_expired_tokens_for_same_user",
    "test_auth.py::CleanupTokenTestCase::test_cleanup_signal_source_other_token",
]


def main() -> int:
    tests = knox_tests()
    failed = 0
    # (mode, USER_CACHE, LOCAL_CACHE_SIZE): knox's tests as written, then with commits (served
    # from Redis), then with USER_CACHE (users built from cached rows), then with both modes.
    for mode, user_cache, local_cache in (
        ("as-written", "0", "0"),
        ("transactional", "0", "0"),
        ("transactional", "1", "0"),
        ("transactional", "1", "1"),
    ):
        label = (
            mode + (", USER_CACHE" if user_cache == "1" else "") + (", LOCAL_CACHE_SIZE" if local_cache == "1" else "")
        )
        print(f"running knox's own tests ({label}) from {tests.relative_to(ROOT)} with knox_redis swapped in")
        deselect = [f"--deselect={t}" for t in TRANSACTIONAL_DESELECT] if mode == "transactional" else []
        failed |= subprocess.call(
            [
                sys.executable,
                "-m",
                "pytest",
                "-c",
                str(HERE / "pytest.ini"),
                "--rootdir",
                str(tests),
                str(tests),
                *deselect,
                *sys.argv[1:],
            ],
            cwd=ROOT,
            env={
                **os.environ,
                "KNOX_SUITE_MODE": mode,
                "KNOX_SUITE_USER_CACHE": user_cache,
                "KNOX_SUITE_LOCAL_CACHE": local_cache,
            },
        )
    return failed


if __name__ == "__main__":
    sys.exit(main())
