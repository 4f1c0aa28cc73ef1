# Two commands do everything on a fresh machine:  `make run`  (set-up + the main job)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
SHARED ?= ../shared
# Defaults: the shared copy of the dataset and offline weights when present, else torchvision's ImageNet weights.
DATA    ?= $(SHARED)/data/fashion-product-images-small
WEIGHTS ?= $(if $(wildcard $(SHARED)/weights/mobilenet_v2-imagenet.pth),$(SHARED)/weights/mobilenet_v2-imagenet.pth,imagenet)
BACKBONE ?= mobilenet_v2
CACHE   ?= cache
RUNS    ?= runs

.PHONY: install run test bench clean

$(BIN)/featpipe: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/featpipe

run: install
	$(BIN)/featpipe extract --data $(DATA) --backbone $(BACKBONE) --weights $(WEIGHTS) --cache-dir $(CACHE)

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(CACHE)/*.h5 $(CACHE)/*.parts $(RUNS)
