# Two commands on a fresh machine:  make demo   |   make test
# Each creates .venv, installs zerobit (torch 2.13.0 CPU) and gets Fashion-MNIST by itself.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
WHEELS := $(wildcard /opt/wheels)
PIPFLAGS := $(if $(WHEELS),--find-links $(WHEELS),)

.PHONY: setup data browser demo test test-fast bench lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(PIPFLAGS) "torch==2.13.0"
	$(PY) -m pip install -q $(PIPFLAGS) -e ".[dev]"
	touch $@

# Fashion-MNIST: the Debian package when we may install it, else the official download (SHA-256 checked).
data: setup
	@if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] && [ "$$(id -u)" = 0 ] \
	    && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 || \
	  echo "apt-get could not install dataset-fashion-mnist; trying the download"; fi
	$(PY) -m zerobit.data

demo: data
	$(VENV)/bin/zerobit demo

# The report test renders the HTML in headless Chromium (Debian's chromium-headless-shell) when it can be had.
browser:
	@if ! command -v chromium-headless-shell chromium >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] \
	    && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium-headless-shell) \
	    >/dev/null 2>&1 || echo "apt-get could not install chromium-headless-shell; its test will be skipped"; fi

test: data browser
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# Long (many hours on 2 cores; minutes on a GPU with DEVICE=cuda): the 3-epoch compression table with the peer,
# the quantizer comparison, the QAT throughput ratio, then AJPQ's proxy study; results → BENCHMARKS.md
DEVICE ?= auto
EPOCHS ?= 3
bench: data
	$(PY) bench/compression.py --strategies uniform,sequential,opq,admm,peer --budgets 1/16,1/32,1/64,1/128 --epochs $(EPOCHS) --device $(DEVICE)
	$(PY) bench/compression.py --strategies uniform,sequential,opq --budgets bops=1/64 --epochs $(EPOCHS) --device $(DEVICE)
	$(PY) bench/compression.py --strategies ajpq --budgets 1/32,1/64,bops=1/64 --epochs $(EPOCHS) --option episodes=300 --device $(DEVICE)
	$(PY) bench/quantizers.py --cases 1/12@4,1/16@3,1/32@2 --epochs 1 --device $(DEVICE)
	$(PY) bench/qat_throughput.py --device $(DEVICE)
	$(PY) bench/ajpq_proxy.py --policies 10 --budget 1/32 --epochs 0.5 --device $(DEVICE)
	$(PY) bench/ajpq_proxy.py --policies 10 --budget 1/64 --epochs 0.5 --only bfloat16 --out bench/results/ajpq_proxy_1over64.json --device $(DEVICE)
	rm -f runs/ajpq_rerank.state
	$(PY) bench/ajpq_rerank.py --budget 1/32 --top 6 --epochs 0.25 --device $(DEVICE)

lint: setup
	$(VENV)/bin/ruff check zerobit tests bench

clean:
	rm -rf $(VENV) runs
