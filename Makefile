# attnlab — set-up, tests and the demo. Two commands matter: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# A bare `torch` requirement pulls several GB of CUDA wheels; pin the CPU build first.
TORCH  ?= torch==2.13.0
# PyPI's Linux torch wheel is the CUDA build; where pip's index does not serve a CPU build
# (this project's machines do), `make test TORCH_INDEX=https://download.pytorch.org/whl/cpu`
TORCH_INDEX ?=
# The test run starts some hundred Python processes (commands, servers, distributed
# ranks, benchmarks): they share compiled bytecode even where PYTHONDONTWRITEBYTECODE is
# set (an empty value unsets it).
export PYTHONDONTWRITEBYTECODE =

.PHONY: demo test lint typecheck pytest bench-smoke install dev browser clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e .
	touch $@

# The test tools and extras are not byte-compiled at install (half of its time): the
# modules the suite imports are compiled when first imported, and kept (below).
$(VENV)/.dev: $(VENV)/.base
	$(PY) -m pip install -q --no-compile -e ".[dev]"
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

# Each benchmark's smoke run (tiny sizes, one run, figures not checked; benchmarks/smoke.py
# checks that every line it prints is strict JSON) is its own target,
# so that `make test` can run them two at a time beside mypy.
SMOKE_hf          := bench_hf.py --smoke
SMOKE_minilm      := bench_minilm.py --smoke
SMOKE_ask         := bench_ask.py --smoke
SMOKE_core        := bench_core.py --smoke
SMOKE_core_flex   := bench_core.py --smoke --cases window --modes fwd --flex
SMOKE_serve       := load_serve.py --smoke
SMOKE_distributed := bench_distributed.py --smoke
SMOKE_robust      := bench_robust.py --smoke
SMOKE_approx      := bench_approx.py --smoke
SMOKE_generative  := bench_generative.py --smoke
SMOKE_sweep_hf    := sweep_hf.py --smoke
SMOKE_core_memory := bench_core.py --smoke --memory
SMOKE_rl          := bench_rl.py --smoke
SMOKE_layers      := bench_layers.py --smoke
SMOKE_flow        := bench_flow.py --smoke
SMOKE_auto        := bench_auto.py --smoke
SMOKE_decode      := bench_decode.py --smoke
SMOKE_listops     := listops.py --smoke
SMOKE_layouts     := bench_layouts.py --smoke
SMOKE_overhead    := bench_overhead.py --smoke
SMOKES := $(addprefix smoke-,hf minilm ask core core_flex serve distributed robust approx \
  generative sweep_hf core_memory rl layers flow auto decode listops layouts overhead)  # longest first

.PHONY: $(SMOKES)
$(SMOKES): smoke-%: $(VENV)/.base
	$(PY) benchmarks/smoke.py benchmarks/$(SMOKE_$*)

bench-smoke: $(SMOKES)

# mypy and the benchmarks' smoke runs two at a time (longest first), then pytest on both
# cores (it spreads its tests over two workers).
test: lint
	$(MAKE) -j2 --output-sync=target typecheck bench-smoke
	$(MAKE) pytest

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
