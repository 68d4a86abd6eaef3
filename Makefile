# Two commands do all the set-up:  `make demo`  and  `make test`.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Every pip call (and every build environment) stays on the CPU torch wheel on local disk.
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1
DEMO_DATA := data/synthetic
DEMO_RUN := runs/demo
DEMO_NPROC ?= 2

.PHONY: demo test test-fast test-gpu bench clean-demo venv venv-full

$(BIN)/.core:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q setuptools wheel
	$(BIN)/pip install -q --no-build-isolation -e .
	touch $@

# the dev extra plus every optional backend the tests exercise (deepspeed builds against the installed torch)
$(BIN)/.full: $(BIN)/.core setup.py
	$(BIN)/pip install -q --no-build-isolation -e ".[all,dev]"
	$(BIN)/pip install -q --no-deps torch-fidelity==0.4.0
	touch $@

venv: $(BIN)/.core
venv-full: $(BIN)/.full

demo: $(BIN)/.core
	@if [ ! -f $(DEMO_DATA)/train/dataset.json ]; then \
	  $(BIN)/stackgan prepare synthetic --out $(DEMO_DATA) --train 4000 --test 400; fi
	$(BIN)/python -m torch.distributed.run --standalone --nproc_per_node $(DEMO_NPROC) -m stackgan_dist \
	  train configs/demo/stage1.yaml
	$(BIN)/python -m torch.distributed.run --standalone --nproc_per_node $(DEMO_NPROC) -m stackgan_dist \
	  train configs/demo/stage2.yaml
	$(BIN)/stackgan sample $(DEMO_RUN)/stage2 --out $(DEMO_RUN)/samples.png \
	  --text "a small red circle on a black background" --text "a large yellow square on a blue background" \
	  --text "a green triangle in front of a white background" --text "a small purple circle over gray"
	$(BIN)/stackgan eval $(DEMO_RUN)/stage2 --data $(DEMO_DATA)/test --metrics caption --out $(DEMO_RUN)/eval.json

clean-demo:
	rm -rf $(DEMO_RUN)

test: $(BIN)/.full
	bash tests/cluster/start_clusters.sh
	$(BIN)/python -m pytest -q tests --ignore=tests/gpu

# the quick loop: no cluster tests
test-fast: $(BIN)/.full
	$(BIN)/python -m pytest -q tests --ignore=tests/gpu -m "not cluster"

test-gpu:
	python3 -m pytest -q tests/gpu

bench: $(BIN)/.full
	$(BIN)/python benchmarks/run_suite.py --device cpu
