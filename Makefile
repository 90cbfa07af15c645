# The two quick-start commands: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Flower's SuperLink would otherwise `uv sync` the app's dependencies at run time
# (see docs/): keep the pinned torch of this venv.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: install test test-slow bench-quick clean demo flwr-run deploy bench-federated

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# The default federation: 10 virtual clients, bundled MNIST, Dirichlet(0.5), DM at IPC 10,
# one-shot. Prints the global accuracy and the run store's path. The server trains for 100
# epochs instead of the run-config's 300: a third of the time (~50 s instead of ~150 s on 2
# cores) for a fraction of a point on this pool (BENCHMARKS.md "make demo").
demo: $(STAMP)
	$(PY) simulations/run.py --clients 10 --partitioner dirichlet --alpha 0.5 --method dm --ipc 10 --mode one-shot --name demo --set server-epochs=100

# The same app through `flwr run .` (local simulation SuperLink, FLWR_HOME=./.flwr).
flwr-run: $(STAMP)
	simulations/flwr_local.sh

# A real deployment on 127.0.0.1: SuperLink behind a Fleet-only TLS proxy, 2 SuperNodes with node
# authentication and app approval, `flwr run`, everything stopped after (README "Run a real
# federation"; state in .deploy/; loopback demo: the node keys are made here, labelled DEMO ONLY).
deploy: $(STAMP)
	$(PY) simulations/deploy.py run --nodes 2

bench-federated: $(STAMP)
	$(PY) simulations/bench_federated.py

bench-quick: $(STAMP)
	$(PY) simulations/bench_distill.py --quick

clean:
	rm -rf runs bench_results .pytest_cache .flwr .deploy
