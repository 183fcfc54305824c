# Two commands for a fresh machine:
#   make demo   set up, then run the main job at small CPU scale (figures in plots/)
#   make test   set up, then run the test suite
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-stamp
DEMO_DATA ?= data/demo

.PHONY: setup demo test test-slow bench clean-demo

$(STAMP): requirements.txt requirements-dev.txt scripts/setup.sh scripts/setup_wordnet.py
	bash scripts/setup.sh
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(PY) markov_circles_timeseries.py --n-steps 20000 --out-dir $(DEMO_DATA) --plots-dir plots/demo --force
	$(PY) estimate_dimension.py --data-dir $(DEMO_DATA) --points 10000 --out-dir plots/demo

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) tests/benchmarks/run_all.py
