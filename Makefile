# make demo: set up .venv, prepare a built-in corpus, train about 100 seconds on CPU, evaluate, sample
# make test: set up .venv, lint, the fast tier of the tests; make test-all: every test (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# the CPU build of torch; install it before the project so pip does not pull a multi-GB CUDA build
TORCH  ?= torch==2.13.0
DEMO   ?= carlos_demo

# two pytest workers, one torch thread each (tests/conftest.py): measured faster on 2 cores (docs/TESTS.md).
# A file's tests run in one worker: its module fixtures are built once, and test_errors' last test reads
# what the others printed
PYTEST := $(BIN)/python -m pytest -q -n 2 --dist loadfile

.PHONY: install demo test test-all lint format clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test,sweep,plot,tensorboard,hf,compressors]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python scripts/demo_corpus.py $(DEMO)/corpus.txt
	$(BIN)/carlos prepare --input $(DEMO)/corpus.txt --workdir $(DEMO)/run --overwrite
	$(BIN)/carlos train --workdir $(DEMO)/run --overwrite --max_steps 2000 --warmup_steps 200 \
		--eval_interval 250 --ckpt_interval 500
	$(BIN)/carlos eval --workdir $(DEMO)/run --checkpoint best --split test
	$(BIN)/carlos sample --workdir $(DEMO)/run --prompt "import " --max_new_tokens 200 --temperature 0.9 --top_p 0.95

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(PYTEST) -m "not slow"

test-all: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(PYTEST) -m "not slurm"
	$(BIN)/python -m pytest -q -m slurm  # one at a time: its jobs share the one-node cluster

lint: install
	$(BIN)/ruff check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) $(DEMO) build dist *.egg-info .pytest_cache .ruff_cache
