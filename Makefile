# Two commands do everything on a fresh machine:
#   make train   set up .venv (Python 3.12), train the quickstart config, evaluate it, write a sample
#   make test    set up .venv, run the whole test suite
# Both are idempotent: the environment is rebuilt only when requirements.txt changes, and
# `make train` resumes its run (delete runs/quickstart for a fresh one).

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN ?= runs/quickstart
QUICKSTART := configs/quickstart.py

# The first of these that is Python 3.12.
PYTHON312 := $(shell for p in python3.12 python3 $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.12*/bin/python3; do \
	if command -v $$p >/dev/null 2>&1 && [ "$$($$p -c 'import sys; print(sys.version_info[:2] == (3, 12))' 2>/dev/null)" = True ]; then command -v $$p; break; fi; done)

.PHONY: setup train test clean

setup: $(STAMP)

$(STAMP): requirements.txt
	@if [ -z "$(PYTHON312)" ]; then \
		echo "error: Python 3.12 is required (the GPU image runs 3.12) and was not found as python3.12 or python3." >&2; \
		echo "Install it (e.g. 'pyenv install 3.12' or your package manager's python3.12) and run make again." >&2; \
		exit 1; fi
	@if [ ! -x $(PY) ] || [ "$$($(PY) -c 'import sys; print(sys.version_info[:2] == (3, 12))')" != True ]; then \
		rm -rf $(VENV); echo "Creating $(VENV) with $(PYTHON312)"; $(PYTHON312) -m venv $(VENV); fi
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $(STAMP)

train: setup
	$(PY) scripts/train.py --config $(QUICKSTART) --workdir $(RUN)
	$(PY) scripts/evaluate.py --config $(QUICKSTART) --workdir $(RUN) --split test
	$(PY) scripts/sample.py --config $(QUICKSTART) --workdir $(RUN) --num_samples 2 --length 256 \
		--output $(RUN)/samples --prompt_from_split valid
	@echo
	@echo "Checkpoints: $(RUN)/checkpoints"
	@echo "Metrics:     $(RUN)/metrics.jsonl (TensorBoard: $(RUN)/tensorboard)"
	@echo "Evaluation:  $$(ls $(RUN)/eval_test_*.json | tail -n 1)"
	@echo "Samples:     $(RUN)/samples"

test: setup
	SPARSE_LM_REQUIRE_SHARED_DATA=$${SPARSE_LM_REQUIRE_SHARED_DATA:-0} $(PY) -m pytest -q -n 2 --dist loadfile --durations=15 tests

clean:
	rm -rf $(VENV) runs
