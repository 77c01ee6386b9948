# Two commands on a fresh machine:
#   make demo   set up everything, then run the main job
#   make test   set up everything, then run the test suite
# Set-up is idempotent: it re-installs only when pyproject.toml changes.

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   ?= runs/sim
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup mosquitto datasets demo test test-fast lint clean

setup: $(STAMP) mosquitto datasets

mosquitto:
	@command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || \
	  { echo "installing mosquitto with apt"; $(SUDO) apt-get update -q && \
	    DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q mosquitto; }

# Fashion-MNIST for `sfprompt-sim --data fashion-mnist`, as Debian packages it (IDX files).
datasets:
	@[ -f $(FASHION) ] || \
	  { echo "installing dataset-fashion-mnist with apt"; $(SUDO) apt-get update -q && \
	    DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q dataset-fashion-mnist; }

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e ".[all]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/sfprompt-sim --out $(DEMO)

test: setup
	$(PY) -m pytest

# The fast loop: everything but the tests marked slow (real processes, real-size exports).
test-fast: setup
	$(PY) -m pytest -m "not slow"

# The checkout itself resolves `sfprompt.<part>` (committed links), so the tools read the source.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy sfprompt/protocol sfprompt/edge_client

clean:
	rm -rf $(VENV) runs
