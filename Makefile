# frag: two set-up commands for a fresh machine: `make demo` (the main job) and `make test` (the tests).
VENV   ?= .venv
PY     := $(VENV)/bin/python
FRAG   := $(VENV)/bin/frag
STAMP  := $(VENV)/.frag-installed
PROMPT ?= a red circle on a blue background
export FRAG_THREADS ?= 1
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test lint clean

setup: $(STAMP)

# Idempotent: re-installs only when pyproject.toml changes (or the venv is missing).
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

demo: setup
	$(FRAG) profile "$(PROMPT)" --seeds 4 --profile-steps 5 --out reports/demo/profile --overwrite
	$(FRAG) extract reports/demo/profile --head-retention 0.7 --out fragments/demo --overwrite
	$(FRAG) generate "$(PROMPT)" --fragment fragments/demo --seeds 0-7 --batch-size 4 --out reports/demo/generate --overwrite

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check fragcli tests tools

clean:
	rm -rf reports/demo fragments/demo .frag
