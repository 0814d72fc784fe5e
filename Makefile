# bitbench: two commands do all the set-up on a fresh machine.
#   make run   - venv (if missing), API + dispatcher + local Ray on SQLite, the demo sweep, dashboard URL
#   make test  - venv (if missing), the whole test suite
#   make lint  - ruff (E, F, I, B, UP at 120 columns) over the code and tests, mypy over estimators/ and service/
#   make test-fast - the inner loop: the suite without the browser, PostgreSQL and slow tests (3 min on 2 cores)
#   make mutate - mutation testing with cosmic-ray, module by module (mutation/*.toml; MUTATE="estimators train" for
#                 some); an hour or more on 2 cores; results summarised by mutation/report.py, see docs/mutation.md
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test test-fast lint venv system-deps clean bench mutate

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

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not postgres and not browser" $(PYTEST_ARGS)

$(VENV)/.installed-lint: $(STAMP)
	$(PY) -m pip install --quiet -e '.[lint]'
	touch $@

lint: $(VENV)/.installed-lint
	$(VENV)/bin/ruff check estimators workers service dashboard tests bench scripts mutation
	$(VENV)/bin/mypy

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
