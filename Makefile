# bitbench: two commands do all the set-up on a fresh machine.
#   make run   - venv (if missing), API + dispatcher + local Ray on SQLite, the demo sweep, dashboard URL
#   make test  - venv (if missing), the whole test suite
#   make mutate - mutation testing with cosmic-ray, module by module (mutation/*.toml; MUTATE="estimators train" for
#                 some); an hour or more on 2 cores; results summarised by mutation/report.py, see docs/mutation.md
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test venv system-deps clean bench mutate

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

system-deps:
	@bash scripts/system-deps.sh

test: $(STAMP) system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

run: $(STAMP)
	$(PY) -m service.run

$(VENV)/.installed-mutate: $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,mutate]'
	touch $@

mutate: $(VENV)/.installed-mutate
	bash mutation/run.sh $(MUTATE)

bench: $(STAMP)
	$(PY) bench/estimators.py

clean:
	rm -rf $(VENV) .pytest_cache
