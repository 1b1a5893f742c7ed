# Two commands for a fresh machine: `make run` and `make test` (both create .venv when missing).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

# Offline and quiet: no analytics, tool homes inside the project.
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export GX_ANALYTICS_ENABLED := false
export BENTOML_DO_NOT_TRACK := true
export HF_HUB_OFFLINE := 1
export PREFECT_HOME ?= $(CURDIR)/.home/prefect
export BENTOML_HOME ?= $(CURDIR)/.home/bentoml
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120

.PHONY: run test test-fast install lock bench peer-env clean review

$(STAMP): pyproject.toml requirements/constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: vqflow needs Python 3.11"; exit 1; }
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade "pip==26.3"
	$(VENV)/bin/pip install --quiet -c requirements/constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	dvc repro
	vqflow summary

test: $(STAMP)
	pytest -q -n 2 --dist loadfile --durations=25

# the edit-test loop: everything but the end-to-end tests marked slow (servers, repositories, retraining)
test-fast: $(STAMP)
	pytest -q -n 2 --dist loadfile --durations=10 -m "not slow"

# The bench-only peer (anomalib) lives in its own environment, never in .venv.
PEER := .venv-peer
$(PEER)/.installed: bench/peer-requirements.txt bench/peer-constraints.txt
	test -x $(PEER)/bin/python || $(PYTHON) -m venv $(PEER)
	$(PEER)/bin/pip install --quiet -r bench/peer-requirements.txt -c bench/peer-constraints.txt
	touch $@

peer-env: $(PEER)/.installed

# Every benchmark (long: DVC experiments on default and real data, CIFAR-10, anomalib); results in bench/results/.
# `dvc plots diff` against REV as HTML that renders offline (Vega from npm, copied beside the page):
# make review REV=HEAD~1  ->  plots_diff/index.html
REV ?= HEAD
VEGA := .home/vega/node_modules
review: $(STAMP)
	test -f $(VEGA)/vega-embed/build/vega-embed.min.js || npm install --silent --prefix .home/vega vega@5 vega-lite@5 vega-embed@6
	dvc plots diff $(REV) -o plots_diff --html-template review/plots.html
	mkdir -p plots_diff/vega
	cp $(VEGA)/vega/build/vega.min.js $(VEGA)/vega-lite/build/vega-lite.min.js $(VEGA)/vega-embed/build/vega-embed.min.js plots_diff/vega/

bench: $(STAMP) $(PEER)/.installed
	python bench/run_all.py

lock: $(STAMP)
	{ echo "# pip constraints: the exact versions CI and 'make' install (regenerate with 'make lock')."; \
	  pip freeze --exclude-editable | grep -v '^vqflow'; } > requirements/constraints.txt

clean:
	rm -rf .home .pytest_cache
