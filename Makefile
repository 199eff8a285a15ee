# protoserve: every set-up step lives here; `make demo` and `make test` do all of it.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PROTOSERVE := $(VENV)/bin/protoserve

# The data root: ../shared/data/mnist when it exists, else $PROTOSERVE_DATA_ROOT.
SHARED_MNIST := $(wildcard $(CURDIR)/../shared/data/mnist)
export PROTOSERVE_DATA_ROOT := $(if $(SHARED_MNIST),$(abspath $(SHARED_MNIST)),$(PROTOSERVE_DATA_ROOT))

.PHONY: setup demo test lint train-default evaluate-default visualize-default clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[train,dev]"
	touch $@

# Main job (until the service lands): a short PrototypeDL run and its pictures.
demo: setup
	$(PROTOSERVE) train --config configs/prototypedl_mnist_demo.yaml --out runs/demo $$(test -f runs/demo/last.pt && echo --resume)
	$(PROTOSERVE) evaluate --checkpoint runs/demo/best.pt
	$(PROTOSERVE) visualize --checkpoint runs/demo/best.pt --out runs/demo/pictures

test: setup lint
	$(VENV)/bin/pytest

lint: setup
	$(VENV)/bin/ruff check .

# The shipped default model (models/prototypedl_mnist): about an hour on 2 CPU cores.
train-default: setup
	$(PROTOSERVE) train --config configs/prototypedl_mnist_fast.yaml --out runs/prototypedl_mnist_fast $$(test -f runs/prototypedl_mnist_fast/last.pt && echo --resume)

clean:
	rm -rf runs/demo .pytest_cache
