# Quick start: `make demo` (the Fashion-MNIST lab end to end) and `make test`. Each installs what it needs.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error

.PHONY: deps demo test lint bench bench-perf bench-real bench-datapath clean-demo

# The package goes in with --no-deps (fast: requirements.txt pins every dependency); .ci/install_check
# proves that pyproject.toml declares them too, with `pip install .` into a fresh venv.
$(STAMP): requirements.txt pyproject.toml
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.txt
	$(BIN)/pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

$(FASHION_MNIST):
	$(SUDO) apt-get update -q
	$(SUDO) apt-get install -y -q dataset-fashion-mnist

deps: $(STAMP) $(FASHION_MNIST)

# The lab's rows of both methods with one seed, a 400-step teacher (the bench's is 1000 steps) and no
# gradient-share diagnostics, so that it fits 15 minutes on 2 cores; `make bench` is the measured lab
# (benchmarks/README.md).
demo: deps
	$(BIN)/clipdistill demo --config configs/lab.yaml --lab.teacher_steps 400 --lab.grad_share false

bench: deps
	$(BIN)/clipdistill bench --config configs/lab.yaml

# The performance ratios of benchmarks/README.md; PERF_ARGS=--quick for a smoke run.
bench-perf: deps
	$(BIN)/python -m benchmarks.perf $(PERF_ARGS)

# The real pipeline at 224 px on 512-px JPEG shards (CPU, ~10 min), then the reduced-size JPEG decode
# side by side with the full one; results in benchmarks/results/ (benchmarks/real_and_scale.md).
bench-real: deps
	$(BIN)/python -m benchmarks.real
	$(BIN)/python -m benchmarks.decode --side 512

# train's start-up and peak memory at 10k and 10M rows (writes, then deletes, ~1 GB in runs/datapath).
bench-datapath: deps
	$(BIN)/python -m benchmarks.datapath

test: deps
	$(BIN)/ruff check src tests
	$(BIN)/pytest tests

lint: deps
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

clean-demo:
	rm -rf runs/demo
