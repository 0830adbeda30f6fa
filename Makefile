# make demo: set up .venv, prepare a built-in corpus, train about 100 seconds on CPU, evaluate, sample
# make test: set up .venv, lint, run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# the CPU build of torch; install it before the project so pip does not pull a multi-GB CUDA build
TORCH  ?= torch==2.13.0
DEMO   ?= carlos_demo

.PHONY: install demo test test-fast lint format clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test,sweep,plot,tensorboard,hf]"
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
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) $(DEMO) build dist *.egg-info .pytest_cache .ruff_cache
