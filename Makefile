# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test quick lint venv bench gpu-check clean slurm-up slurm-down slurm-demo

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Plain `torch` (not the local +cpu wheel): torchvision from PyPI only imports against the matching build.
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m examples.demo

# The whole suite as CI runs it: two xdist workers, the simulated clusters beside the rest (conftest.py).
# A short --basetemp: the tests' TMPDIRs are in it, and a socket's path there must stay under 108 bytes
# (pytest's own, /tmp/pytest-of-USER/pytest-NNN/popen-gwN/..., grows with every run on a machine).
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadgroup --durations=30 --basetemp=/tmp/launcher-tests-$$(id -u)

# The quick tier: no process started, under a minute (conftest.py enforces the bound).
quick: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" --durations=10

# House style (../shared/STYLE.md): ruff (lines <= 110) and mypy clean; settings in pyproject.toml.
lint: $(STAMP)
	$(PY) -m pip install -q -e '.[lint]'
	$(PY) -m ruff check .
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) -m benchmarks

# The GPU paths in one go on a machine with CUDA (tests/gpu.py, 5 minutes at most); without CUDA it says so, exit 0.
gpu-check: $(STAMP)
	$(PY) -m tests.gpu

# The local one-node SLURM cluster (slurm/cluster.sh; installs Debian packages when missing, needs root).
slurm-up:
	bash slurm/cluster.sh up

slurm-down:
	bash slurm/cluster.sh down

# One command to see `launcher submit` on the local cluster: up, submit the tiny job, follow it.
slurm-demo: $(STAMP) slurm-up
	SLURM_CONF=$${LAUNCHER_SLURM_DIR:-/tmp/launcher-slurm}/etc/slurm.conf \
	  $(VENV)/bin/launcher submit jobs/tiny.yaml args.max_steps=30 slurm.time_min=5 --wait

clean:
	rm -rf runs .pytest_cache
