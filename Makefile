# The two commands: `make run` and `make test`. Both create .venv and install first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_ORDERS ?= 200

.PHONY: install run test test-fast lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("orderledger needs Python 3.11 or newer") if sys.version_info < (3, 11) else None'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The embedded default keeps its master key in var/master.key (made once, readable by you
# alone); ORDERLEDGER_MASTER_KEY in the environment wins.
MASTER_KEY := $${ORDERLEDGER_MASTER_KEY:-$$(cat var/master.key)}

run: install
	@test -s var/master.key || (mkdir -p var && umask 077 && $(BIN)/orderledger customers new-master-key > var/master.key)
	ORDERLEDGER_MASTER_KEY=$(MASTER_KEY) $(BIN)/orderledger demo --if-empty --orders $(DEMO_ORDERS)
	ORDERLEDGER_MASTER_KEY=$(MASTER_KEY) $(BIN)/orderledger keys bootstrap
	ORDERLEDGER_MASTER_KEY=$(MASTER_KEY) $(BIN)/orderledger serve --host 127.0.0.1 --port 8000

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Unit and integration tiers, slow tests left out, four workers: the edit loop.
test-fast: install
	$(BIN)/python -m pytest tests/unit tests/integration -m "not slow" -n 4 $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: install
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
