# Ferry: the two commands a new user needs are `make demo` and `make test`; both install what is
# missing first (Debian packages, the .venv, unikernel builds).
VENV := .venv
PY := $(VENV)/bin/python
FERRY := $(VENV)/bin/ferry

.PHONY: setup setup-podman test lint demo bench bench-quick up down status clean

setup:
	@bash deploy/setup.sh

setup-podman:
	@bash deploy/setup.sh --podman

test: setup-podman
	$(VENV)/bin/ruff check services tools tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q -ra

lint: setup
	$(VENV)/bin/ruff check services tools tests bench
	$(VENV)/bin/mypy

# DEMO_ARGS: e.g. --keep (leave the stack up afterwards) or --runtime unix
demo: setup
	$(PY) -m tools.cli.demo $(DEMO_ARGS)

# bench.drain (issue 13): drain of N services per runtime on the local stack, after the netlab run.
bench: setup-podman
	$(PY) -m bench.run
	$(PY) -m bench.drain

bench-quick: setup-podman
	$(PY) -m bench.run --quick
	$(PY) -m bench.drain --quick

up: setup
	$(FERRY) up

down:
	$(FERRY) down

status:
	$(FERRY) status

clean:
	-$(FERRY) down 2>/dev/null
	$(MAKE) -C unikernel clean
	rm -rf .ferry .pytest_cache .mypy_cache .ruff_cache
