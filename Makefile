# dcd: every target that needs the environment depends on `install`, so each works as the first command typed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

TEACHER      ?= meter
DATA         ?= synthetic
DATA_ROOT    ?=
TEACHER_CKPT ?=
STUDENT      ?=
OUT          ?=
DEVICE       ?= cpu
EPOCHS       ?=
ARGS         ?=

DISTILL_FLAGS = --teacher $(TEACHER) --data $(DATA) $(if $(STUDENT),--student $(STUDENT)) --device $(DEVICE) \
	$(if $(DATA_ROOT),--data-root $(DATA_ROOT)) $(if $(TEACHER_CKPT),--teacher-checkpoint $(TEACHER_CKPT)) \
	$(if $(OUT),--out $(OUT)) $(if $(EPOCHS),--epochs $(EPOCHS)) $(ARGS)

SEEDS        ?= 0,1,2

.PHONY: install test distill ablations teacher bench bench-index bench-throughput data docs clean

install: $(STAMP)

# torch is pinned to the release that lies on the build machines' disk; the rest comes from setup.cfg.
$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

distill: install
	$(BIN)/dcd distill $(DISTILL_FLAGS)

# the compression experiment: every ablation row over SEEDS -> benchmarks/results/compression.{json,md,png}.
# 8 epochs: where the embedded students' val RSUM stops rising (10-16 min per student on one core in bf16, 2026-12-06)
# TEACHER_CONFIG="max_steps=3200 epochs=16": the embedded teacher trained with those overrides (its own folder,
# its own sweep folder); RESULTS: where the JSON goes (the .md and .png beside it)
ABLATION_EPOCHS ?= 8
TEACHER_CONFIG  ?=
empty :=
space := $(empty) $(empty)
# "max_steps=3200 epochs=16" -> "-max_steps3200-epochs16": names the sweep folder and the default results file
CONFIG_TAG   = $(if $(strip $(TEACHER_CONFIG)),-$(subst /,_,$(subst =,,$(subst $(space),-,$(strip $(TEACHER_CONFIG))))))
RESULTS     ?= benchmarks/results/compression$(CONFIG_TAG).json
ABLATION_OUT = runs/ablations-$(TEACHER)-$(ABLATION_EPOCHS)ep$(CONFIG_TAG)
ablations: install
	$(BIN)/dcd ablations --teacher $(TEACHER) --data $(DATA) --device $(DEVICE) --seeds $(SEEDS) \
		--epochs $(ABLATION_EPOCHS) --out $(ABLATION_OUT) --results $(RESULTS) \
		$(foreach kv,$(TEACHER_CONFIG),--teacher-config $(kv)) \
		$(if $(DATA_ROOT),--data-root $(DATA_ROOT)) $(if $(TEACHER_CKPT),--teacher-checkpoint $(TEACHER_CKPT)) $(ARGS)

teacher: install
	$(BIN)/dcd teacher --teacher $(TEACHER) --data $(DATA) --device $(DEVICE) \
		$(if $(DATA_ROOT),--data-root $(DATA_ROOT)) $(ARGS)

# the tables of README.md and docs/ that come from benchmarks/results/ (the tests check they are current)
docs: install
	$(BIN)/python -m dcd.docs

bench: install
	$(BIN)/python benchmarks/latency.py --device $(DEVICE) $(ARGS)

# FAISS flat / HNSW / IVF-PQ at 100k and 1M vectors (10M projected): writes benchmarks/results/index.json and the plot
bench-index: install
	$(BIN)/python benchmarks/index.py $(ARGS)

# fp32 against bf16 per stage, and where a training step's time goes: writes benchmarks/results/throughput.json
bench-throughput: install
	$(BIN)/python benchmarks/throughput.py $(ARGS)

data: install
	$(BIN)/dcd data $(ARGS)

clean:
	rm -rf runs build dist *.egg-info .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
