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


# In transactional mode only, two tests that count queries (both pass as written):
# - outside TestCase's wrapping transaction each delete of an expired sibling is
#   BEGIN/DELETE/COMMIT (Django can't use its signal-less fast delete once knox_redis listens
#   to pre_delete);
# - the first request with a token knox_redis has never seen costs knox's 2 queries plus one
#   re-read of the row under a fresh generation (so unauthenticated requests never write to
#   Redis); every later request costs 1.
TRANSACTIONAL_DESELECT = [
    "test_auth.py::CleanupTokenTestCase::test_cleanup_query_count_with_expired_siblings",
    "test_views.py::TokenAuthenticationTestCase::test_token_auth_n_plus_one",
]


def main() -> int:
    tests = knox_tests()
    failed = 0
    for mode in ("as-written", "transactional"):
        print(f"running knox's own tests ({mode}) from {tests.relative_to(ROOT)} with knox_redis swapped in")
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
            env={**os.environ, "KNOX_SUITE_MODE": mode},
        )
    return failed


if __name__ == "__main__":
    sys.exit(main())
