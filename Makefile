# enrich: make install | test | demo | nightly | bench | chaos | fuzz | lint
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
ENRICH := $(VENV)/bin/enrich

.PHONY: all install bytecode test demo nightly bench chaos fuzz lint clean

all: test lint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,ray]'
	touch $@

install: $(VENV)/.installed

# pip compiles what it installs, but an editable install's sources get no bytecode where
# PYTHONDONTWRITEBYTECODE is set: every `enrich` process would compile them again (~0.3 s each).
bytecode: install
	$(PY) -m compileall -q enrich tests

# three workers on this machine's two cores (TEST_WORKERS=N to change), each test file on one worker (its
# module-scoped jobs are made once): the suite waits on subprocesses and emulators more than it computes.
# Idle 2-core machine: 772 tests in 9.6 min on 3 workers; loaded: 18.7 min in one process, 12.2 min on 2.
TEST_WORKERS ?= 3
test: bytecode
	$(PY) -m pytest -q -m "not slow" -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile

demo: bytecode
	$(ENRICH) run configs/companies.toml --emulator
	@$(PY) -c "import polars as pl, json; pl.Config.set_tbl_cols(7); pl.Config.set_fmt_str_lengths(28); pl.Config.set_tbl_width_chars(170); \
	df = pl.read_parquet('out/companies.enriched.parquet'); \
	print(df.select(['company', 'headquarters_location', 'headquarters_location__confidence', \
	'headquarters_location__decision', 'headquarters_location__processor', 'founded_year', '_enrich_status']).head(8)); \
	r = json.load(open('out/companies.enriched.parquet.report.json')); \
	print('decisions:', {k.split('__')[0]: v for k, v in r.get('decision_counts', {}).items()}); \
	print('escalated to', r['ladder'][1:], ':', r.get('rows_escalated_this_invocation'), 'rows; runs created:', \
	r.get('runs_created_this_invocation'), '; spent USD', r['spend_usd']); \
	print('output: out/companies.enriched.parquet (EMULATED data)  report: out/companies.enriched.report.html  ' \
	'review: out/companies.enriched.review.csv')"

# Against the real API; exits with the run's exit code (0 done, 3 failed rows, 4 budget, 5 auth, 75 interrupted).
nightly: install
	@test -n "$$PARALLEL_API_KEY" || { echo "make nightly: PARALLEL_API_KEY is not set (try 'make demo' for the emulator)" >&2; exit 2; }
	$(ENRICH) run configs/companies.toml --journal out/companies.nightly.journal.sqlite --output out/companies.nightly.parquet

bench: bytecode
	$(PY) -m tests.benchmarks.run

chaos: bytecode
	$(PY) -m pytest -q -m slow -p no:cacheprovider

# 5,000 random inputs into the reader (and CSV round trips): only rows or InputError may come out.
fuzz: bytecode
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q tests/test_bad_input.py -k "reader or round_trip" -p no:cacheprovider

lint: install
	$(VENV)/bin/ruff check enrich tests
	$(VENV)/bin/ruff format --check enrich tests
	$(VENV)/bin/mypy

clean:
	rm -rf out .pytest_cache
