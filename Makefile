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
DEMO_SHAPE_RUN := runs/demo-shape
DEMO_NPROC ?= 2

.PHONY: demo demo-shape test test-fast ds-op clusters test-gpu gpu-wheels bench clean-demo venv venv-full

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

# One demo pipeline, two recipes: $(call demo_pipeline,RUN,STAGE1_OVERRIDES,STAGE2_OVERRIDES) makes the synthetic
# data once, trains Stage-I then Stage-II from it under RUN, draws the grid and scores both stages on the held-out
# captions (RUN/eval_stage1.json, RUN/eval.json).
DEMO_TRAIN = $(BIN)/python -m torch.distributed.run --standalone --nproc_per_node $(DEMO_NPROC) -m stackgan_dist train
define demo_pipeline
	@if [ ! -f $(DEMO_DATA)/train/dataset.json ]; then \
	  $(BIN)/stackgan prepare synthetic --out $(DEMO_DATA) --train 4000 --test 400; fi
	$(DEMO_TRAIN) configs/demo/stage1.yaml run.dir=$(1)/stage1 $(2)
	$(DEMO_TRAIN) configs/demo/stage2.yaml run.dir=$(1)/stage2 model.stage1_checkpoint=$(1)/stage1 $(3)
	$(BIN)/stackgan sample $(1)/stage2 --out $(1)/samples.png \
	  --text "a small red circle on a black background" --text "a large yellow square on a blue background" \
	  --text "a green triangle in front of a white background" --text "a small purple circle over gray"
	$(BIN)/stackgan eval $(1)/stage1 --data $(DEMO_DATA)/test --metrics caption --out $(1)/eval_stage1.json
	$(BIN)/stackgan eval $(1)/stage2 --data $(DEMO_DATA)/test --metrics caption --out $(1)/eval.json
endef

# the 15-minute demo: colour, not yet shape (docs/demo.md)
demo: $(BIN)/.core
	$(call demo_pipeline,$(DEMO_RUN),,)

# the recipe that learns shape as well, about 40 minutes on 2 cores (38 min 29 s measured): Stage-I at a per-worker
# batch of 64 for 5,000 steps, Stage-II with replicate padding (docs/demo.md)
demo-shape: $(BIN)/.core
	$(call demo_pipeline,$(DEMO_SHAPE_RUN),train.batch_size=64 train.max_steps=5000,model.g_padding=replicate)

clean-demo:
	rm -rf $(DEMO_RUN) $(DEMO_SHAPE_RUN)

# Two pytest-xdist workers: most tests wait on process start-up, Slurm or Ray, so two overlap on two cores;
# a module stays on one worker (tests/conftest.py's groups); PYTEST_WORKERS=0 runs all in one process.
# --durations=30 keeps the slowest tests visible in CI's log.
PYTEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup --durations=30 tests --ignore=tests/gpu

# the DeepSpeed op build (compiling) and the cluster start (apt, daemons) overlap: 27 s of gcc on 2 cores here
test: $(BIN)/.full
	$(MAKE) --no-print-directory -j2 -Otarget ds-op clusters
	$(PYTEST)

# the local Slurm and Ray clusters the integration tests use (idempotent; needs root for Slurm)
clusters: $(BIN)/.full
	bash tests/cluster/start_clusters.sh

# the quick loop: no cluster tests
test-fast: $(BIN)/.full ds-op
	$(PYTEST) -m "not cluster"

# DeepSpeed JIT-builds its CPU communication op on first use (1-4 minutes on 2 cores): built once here, before
# pytest, so that no test spends its timeout compiling and no test killed mid-build leaves torch's build lock
# (~/.cache/torch_extensions/.../lock) behind for every later DeepSpeed process to wait on
ds-op: $(BIN)/.full
	set -o pipefail; $(BIN)/python -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()" 2>&1 | tail -1

# -- the GPU machine -------------------------------------------------------------------------------------------
# It reaches no package registry and has its own CUDA torch (2.11), numpy, pillow, pyyaml, tqdm, pytest,
# tensorboard, torchmetrics, matplotlib, psutil, ninja, msgpack and py-cpuinfo. `make gpu-wheels` (here, with a
# registry) puts everything else, as CPython 3.12 x86-64 wheels, into $(GPU_WHEELS), which travels with the
# repository copy; benchmarks/gpu_check.sh installs them into a scratch folder there (--no-index --no-deps).
# Neither target may see the CPU torch constraint: both unset PIP_CONSTRAINT in their own shell.
GPU_WHEELS := .whl/gpu
GPU_PYVER ?= 3.12
GPU_OUT ?= runs/gpu-check
# what the GPU machine lacks; each at the version `make venv-full` (what CI tests) installed in .venv
GPU_WHEEL_PKGS ?= webdataset braceexpand einops hjson pydantic pydantic-core annotated-types typing-inspection \
  typing-extensions packaging
VERSIONS = $(BIN)/python -c 'import sys, importlib.metadata as m; print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))'

# the system python of the GPU machine, nothing installed from a registry: the wheels of `make gpu-wheels`
test-gpu:
	unset PIP_CONSTRAINT; bash benchmarks/gpu_check.sh $(GPU_OUT) --phases env,tests

# deepspeed: a wheel built here with no ops compiled (DS_BUILD_OPS=0), at the version CI tests
gpu-wheels: $(BIN)/.full
	unset PIP_CONSTRAINT; set -euo pipefail; rm -rf $(GPU_WHEELS).tmp; mkdir -p $(GPU_WHEELS).tmp; \
	$(BIN)/pip download -q --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
	  --python-version $(GPU_PYVER) --implementation cp -d $(GPU_WHEELS).tmp $$($(VERSIONS) $(GPU_WHEEL_PKGS)); \
	DS_BUILD_OPS=0 $(BIN)/pip wheel -q --no-cache-dir --no-deps --no-build-isolation -w $(GPU_WHEELS).tmp \
	  $$($(VERSIONS) deepspeed); \
	rm -rf $(GPU_WHEELS); mv $(GPU_WHEELS).tmp $(GPU_WHEELS); \
	ls $(GPU_WHEELS); du -sh $(GPU_WHEELS)

bench: $(BIN)/.full
	$(BIN)/python benchmarks/run_suite.py --device cpu
