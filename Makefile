# calozoo: the two commands of the README (`make demo`, `make test`) do all set-up themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.calozoo-installed
PYTEST_ARGS ?=
# test processes (pytest-xdist): one per core, at most 4; the tests that run a Ray run one at a time
# (tests/conftest.py); TEST_WORKERS=0 runs everything in this process
TEST_WORKERS ?= auto
DEMO_ARGS ?=

.PHONY: demo test install clean bench

demo: $(STAMP)
	$(BIN)/calozoo demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --maxprocesses=4 --dist worksteal $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_simulator.py

install: $(STAMP)

# torch first, so that pip never resolves an unpinned torch to a multi-GB CUDA build on a machine
# without a GPU:
#  - a torch already in the environment (or in the base Python, which the venv then sees through
#    --system-site-packages) is kept as it is: a CUDA build stays a CUDA build;
#  - with an NVIDIA driver (nvidia-smi), the default PyPI build (CUDA);
#  - otherwise the CPU build: a local or configured wheel first, else PyTorch's CPU index.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || { \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "calozoo: using the torch of $(PYTHON) ($$($(PYTHON) -c 'import torch; print(torch.__version__)'))"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; }
	$(BIN)/python -m pip install -q --upgrade pip
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
	  echo "calozoo: keeping torch $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/python -m pip install -q "torch>=2.2"; \
	else \
	  $(BIN)/python -m pip install -q --only-binary=:all: "torch==$(TORCH_VERSION)+cpu" 2>/dev/null || \
	  $(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)" --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(BIN)/python -m pip install -q -e ".[train,test]"
	@touch $(STAMP)

clean:
	rm -rf $(VENV) out mlruns mlartifacts mlflow.db .pytest_cache .hypothesis
