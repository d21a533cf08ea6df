# xorserve: every target sets up .venv first when it is missing or out of date.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= out

.PHONY: setup demo test lint protos bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt pip setuptools
	$(PY) -m pip install -q -c constraints.txt -e '.[train,serve,loadtest,dev,ray]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/xorserve demo --out $(OUT)/demo

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

protos: $(STAMP)
	$(PY) -m serving.protogen

bench: $(STAMP)
	$(PY) bench/serve_perf.py

clean:
	rm -rf $(VENV) $(OUT)
