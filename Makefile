# Two commands: `make demo` and `make test`. Both set up .venv on a bare machine by themselves.
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# One thread per process: two busy-waiting OpenMP pools on 2 cores slow training ~13x (docs/LOG.md, "CPU threads").
export OMP_NUM_THREADS ?= 1
export OMP_WAIT_POLICY ?= PASSIVE
# Playwright (dev extra) drives Debian's chromium; it never downloads a browser of its own.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD := 1

.PHONY: setup browser demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# With no torch importable, pin the local CPU build first; a looser spec pulls a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: setup
	bash scripts/demo.sh

# The arena's browser tests (tests/test_arena_browser.py) need /usr/bin/chromium: installed here when run as root (CI,
# a fresh machine); otherwise those tests fail with a message saying what to install.
browser:
	@test -x /usr/bin/chromium || [ "$$(id -u)" != 0 ] || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# The suite includes lmms-eval on an hf-omni export, in .venv-hf/ (tests/hf_env.py: built from tests/hf_env.lock, cached).
# --durations: the slowest tests, where to look when the suite grows.
test: setup browser
	$(PY) -m pytest -q --durations=15 tests

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

bench: setup
	$(PY) scripts/bench_model.py

clean:
	rm -rf runs/demo
