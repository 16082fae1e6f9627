# barman-dr: `make demo` and `make test` are the two commands; everything else is a step of them.
SHELL := /bin/bash
LAB_DIR ?= $(CURDIR)/.lab
export LAB_DIR
PY := $(CURDIR)/.venv/bin/python

.PHONY: install lab-up lab-down lab-status demo test test-fast lint bench

install:            ## apt packages, the barman user, the Barman and Airflow venvs (idempotent)
	bash include/lab/install.sh

lab-up: install     ## start the lab (idempotent) and print its status table
	$(PY) include/lab/labctl.py up

lab-down:           ## stop every lab process, by pid
	@if [ -x $(PY) ]; then $(PY) include/lab/labctl.py down; else echo "no venv: nothing to stop"; fi

lab-status:
	$(PY) include/lab/labctl.py status

demo: install       ## the seed's disaster, recovered through the REST API
	bash include/lab/demo.sh

test: install       ## everything: lab up, all tests, lab down (even when tests fail)
	bash include/lab/run_tests.sh

test-fast: install  ## the tests that need no lab (DAG integrity, unit)
	.venv/bin/pytest -q tests/dags tests/unit

lint:
	.venv/bin/ruff check .

bench: install      ## benchmarks (not part of make test)
	bash bench/run.sh
