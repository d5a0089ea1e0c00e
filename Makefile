# attnlab — set-up, tests and the demo. Two commands matter: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# A bare `torch` requirement pulls several GB of CUDA wheels; pin the CPU build first.
TORCH  ?= torch==2.13.0

.PHONY: demo test lint typecheck pytest bench-smoke install dev browser clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.base
dev: $(VENV)/.dev

# The HTML report's browser test drives Debian's chromium with Playwright (no browser
# download). Without root or apt the test skips, and this says so.
$(VENV)/.browser: $(VENV)/.dev
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n" ); \
	  $$SUDO apt-get install -y -q chromium >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO apt-get install -y -q chromium >/dev/null 2>&1; } || \
	  echo "warning: could not install Debian's chromium; the browser tests will be skipped"; }
	touch $@
browser: $(VENV)/.browser

$(VENV)/.demo: $(VENV)/.base
	$(PY) -m pip install -q -e ".[demo]"
	touch $@

demo: $(VENV)/.demo
	$(VENV)/bin/attnlab demo

lint: $(VENV)/.dev
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

typecheck: $(VENV)/.dev
	$(PY) -m mypy

pytest: $(VENV)/.dev $(VENV)/.browser
	$(PY) -m pytest -q -n 2

bench-smoke: $(VENV)/.base
	$(PY) benchmarks/bench_core.py --smoke
	$(PY) benchmarks/bench_core.py --smoke --memory
	$(PY) benchmarks/bench_core.py --smoke --cases window --modes fwd --flex
	$(PY) benchmarks/bench_layers.py --smoke
	$(PY) benchmarks/bench_approx.py --smoke
	$(PY) benchmarks/bench_minilm.py --smoke
	$(PY) benchmarks/bench_flow.py --smoke
	$(PY) benchmarks/bench_distributed.py --smoke
	$(PY) benchmarks/bench_rl.py --smoke
	$(PY) benchmarks/load_serve.py --smoke
	$(PY) benchmarks/bench_hf.py --smoke
	$(PY) benchmarks/sweep_hf.py --smoke
	$(PY) benchmarks/bench_decode.py --smoke
	$(PY) benchmarks/bench_auto.py --smoke
	$(PY) benchmarks/bench_ask.py --smoke
	$(PY) benchmarks/bench_robust.py --smoke
	$(PY) benchmarks/bench_generative.py --smoke

test: lint typecheck pytest bench-smoke

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
