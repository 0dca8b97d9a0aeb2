# The two commands of the README:
#   make demo   build, start a Redis, log in, authenticate, log out (SQLite, nothing to set up)
#   make test   the whole test suite: cargo test, pytest on SQLite and PostgreSQL (beside the
#               previous release, built into build/, for the rolling-deploy tests), knox's own tests
# and the quality gate CI runs first:
#   make lint   ruff (check and format), cargo fmt, clippy, and stubtest of the native module's stub
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench develop clean

$(BIN)/maturin:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "maturin>=1.9.4,<2"

develop: $(BIN)/maturin
	VIRTUAL_ENV=$(abspath $(VENV)) $(BIN)/maturin develop -q --extras test

demo: develop
	$(BIN)/python demo/demo.py

test: develop
	REDIS_SERVER="$$($(BIN)/python -c 'from tests.servers import redis_server_binary as b; print(b())')" cargo test --quiet
	$(BIN)/python -m tests.previous_release
	$(BIN)/python -m pytest
	$(BIN)/python -m pytest --ds=tests.settings_uuid tests/test_uuid_users.py
	@if $(BIN)/python -m tests.pg_available; then \
		KNOX_REDIS_TEST_DB=postgres $(BIN)/python -m pytest && \
		KNOX_REDIS_TEST_DB=postgres $(BIN)/python -m pytest --ds=tests.settings_uuid tests/test_uuid_users.py; \
	else \
		echo "SKIPPED the PostgreSQL pass: no server (see the reason above)"; \
	fi
	$(BIN)/python -m tests.knox_suite.run

# Builds the extension too: stubtest imports it to compare with python/knox_redis/_knox_redis.pyi.
lint: $(BIN)/maturin
	VIRTUAL_ENV=$(abspath $(VENV)) $(BIN)/maturin develop -q --extras lint
	$(BIN)/ruff check
	$(BIN)/ruff format --check
	cargo fmt --check
	cargo clippy --all-targets --quiet -- -D warnings
	$(BIN)/python -m mypy.stubtest knox_redis._knox_redis

bench: develop
	$(BIN)/python bench/bench.py

clean:
	rm -rf $(VENV) target build .nox
