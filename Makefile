# frag: two set-up commands for a fresh machine: `make demo` (the main job) and `make test` (the tests).
VENV   ?= .venv
PY     := $(VENV)/bin/python
FRAG   := $(VENV)/bin/frag
STAMP  := $(VENV)/.frag-installed
PROMPT ?= a large red circle in the center on a blue background
RUN    ?= reports/demo
GATE   ?= reports/gate
export FRAG_THREADS ?= 1
export HF_HUB_OFFLINE ?= 1
export MPLBACKEND ?= Agg

.PHONY: setup demo gate baseline test lint clean train-shapes train-judge eval-shapes formats train-shapes-flux demo-flux

setup: $(STAMP)

# Idempotent: re-installs only when pyproject.toml changes (or the venv is missing).
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

# The main job on the default model: profile -> extract (the speed recipe) -> validate -> generate -> bench (with
# the peers DeepCache, T-GATE and tomesd) -> sweep (head pruning, for H1) -> report (H1-H5).
# The peers (DeepCache, T-GATE, tomesd) are small pure-Python packages, installed for the demo's comparison only
# (--no-deps: they pin nothing frag needs; `make test` and frag itself never import them).
PEERS_STAMP := $(VENV)/.frag-peers
$(PEERS_STAMP): $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps 'DeepCache>=0.1.1' 'tgate>=1.0.0' 'tomesd>=0.1.3'
	@touch $(PEERS_STAMP)

demo: setup $(PEERS_STAMP)
	$(FRAG) profile "$(PROMPT)" --seeds 8 --out $(RUN)/profile --overwrite
	$(FRAG) extract $(RUN)/profile --objective speed --out fragments/demo --overwrite
	$(FRAG) validate fragments/demo --seeds 20 --profile $(RUN)/profile --out $(RUN)/validate --overwrite
	$(FRAG) generate "$(PROMPT)" --fragment auto --seeds 0-7 --batch-size 4 --out $(RUN)/generate --overwrite
	$(FRAG) bench fragments/demo --variants 32 --repeats 3 --peers deepcache,tgate,tomesd --out $(RUN)/bench --overwrite
	$(FRAG) sweep $(RUN)/profile --values 0.9,0.8,0.7,0.6,0.5 --seeds 8 --out $(RUN)/sweep --overwrite
	$(FRAG) report --run $(RUN) --sweep $(RUN)/sweep --compare none --out $(RUN)/report --overwrite

# The same chain on shapes-flux (a trained FluxPipeline, tools/train_shapes_flux.py): the speed objective (block
# caching on transformer denoisers), diffusers' own cache hooks as the peers (DeepCache, T-GATE, tomesd are UNet-only).
FLUX_RUN ?= reports/demo-flux
demo-flux: setup
	$(FRAG) profile "$(PROMPT)" -m shapes-flux --seeds 8 --out $(FLUX_RUN)/profile --overwrite
	$(FRAG) extract $(FLUX_RUN)/profile --objective speed --out fragments/demo-flux --overwrite
	$(FRAG) validate fragments/demo-flux --seeds 20 --profile $(FLUX_RUN)/profile --out $(FLUX_RUN)/validate --overwrite
	$(FRAG) generate "$(PROMPT)" -m shapes-flux --fragment fragments/demo-flux --seeds 0-7 --batch-size 4 --out $(FLUX_RUN)/generate --overwrite
	$(FRAG) bench fragments/demo-flux --variants 32 --repeats 3 --peers fbcache,taylorseer,pab --out $(FLUX_RUN)/bench --overwrite
	$(FRAG) report --run $(FLUX_RUN) --compare none --out $(FLUX_RUN)/report --overwrite

# The CI regression gate: the same chain at small settings, compared with the committed baseline.
# Retention 0.9: the point where the shapes fragment passes the quality gates today, so a regression shows.
gate: setup
	$(FRAG) profile "$(PROMPT)" --seeds 8 --out $(GATE)/profile --overwrite
	$(FRAG) extract $(GATE)/profile --head-retention 0.9 --out $(GATE)/fragment --overwrite
	$(FRAG) validate $(GATE)/fragment --seeds 8 --paraphrase-seeds 1 --profile $(GATE)/profile --out $(GATE)/validate --overwrite
	$(FRAG) bench $(GATE)/fragment --variants 4 --repeats 3 --out $(GATE)/bench --overwrite
	$(FRAG) report --run $(GATE) --compare baseline --gate thresholds.yaml --out $(GATE)/report --overwrite

# Re-record the committed baseline from a fresh gate run (commit reports/baseline afterwards).
baseline: setup
	-$(MAKE) --no-print-directory gate
	rm -rf reports/baseline && mkdir -p reports/baseline && cp -r $(GATE)/report reports/baseline/shapes

test: setup
	$(MAKE) --no-print-directory gate
	$(PY) -m pytest -q -n 2

# The shapes v2 recipe, fresh and reproducible: one process, 2 torch threads, fixed steps and seeds (about 100 min
# on 2 cores). Writes tools/out/shapes/pipeline and its training_report.json; the shipped model is replaced only by
# `python tools/train_shapes.py --stage finish --install`. Interrupted? Run it again: it resumes from the last
# checkpoint (FRESH=1 starts over). The judge (the measuring instrument): `make train-judge`.
train-shapes: setup
	nice -n 10 $(PY) tools/train_shapes.py --stage all --log reports/train-shapes.log $(if $(FRESH),--fresh)

# shapes-flux (a FluxPipeline: shapes v2's VAE and CLIP tower, a small T5 and a Flux transformer trained here): fixed
# steps and seeds, 1 torch thread (2 cost 2.5x the CPU time on a shared 2-core machine); rerunning resumes. Writes
# tools/out/shapes_flux/pipeline; `python tools/train_shapes_flux.py --stage finish --install` ships it.
train-shapes-flux: setup
	nice -n 10 $(PY) tools/train_shapes_flux.py --stage all --log reports/train-shapes-flux.log

train-judge: setup
	nice -n 10 $(PY) tools/train_shapes.py --stage judges --log reports/train-judge.log

# MODEL=shapes-flux measures the trained Flux pipeline the same way (its frag.json's steps and guidance).
EVAL_MODEL := $(if $(MODEL),$(MODEL),shapes)
eval-shapes: setup
	$(PY) tools/eval_shapes.py --model $(EVAL_MODEL) --json --out reports/$(subst -,_,$(EVAL_MODEL))_eval.json

lint: setup
	$(VENV)/bin/ruff check fragcli tests tools

# Regenerate docs/FORMATS.md from the models (tests/test_formats.py fails when it is out of date).
formats: setup
	$(PY) -m fragcli.formats --write

clean:
	rm -rf $(RUN) $(GATE) fragments/demo .frag
