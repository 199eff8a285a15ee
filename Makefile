# protoserve: every set-up step lives here; `make demo` and `make test` do all of it.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PROTOSERVE := $(VENV)/bin/protoserve

# The data root: ../shared/data/mnist when it exists, else $PROTOSERVE_DATA_ROOT.
SHARED_MNIST := $(wildcard $(CURDIR)/../shared/data/mnist)
export PROTOSERVE_DATA_ROOT := $(if $(SHARED_MNIST),$(abspath $(SHARED_MNIST)),$(PROTOSERVE_DATA_ROOT))

.PHONY: setup demo test lint train-default evaluate-default visualize-default bundle-default bench-inference clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[train,dev,batch]"
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

# The shipped bundle (served without training): ONNX graphs, manifest, prototype pictures, from
# the shipped checkpoint; export checks parity on the whole test set and refuses on a miss.
DEFAULT_MODEL := models/prototypedl_mnist
bundle-default: setup
	$(PROTOSERVE) export --checkpoint $(DEFAULT_MODEL)/checkpoint.pt --out $(DEFAULT_MODEL)/bundle \
		--name prototypedl-mnist --version 1.0.0 $$(test -d $(DEFAULT_MODEL)/bundle && echo --force)
	$(PROTOSERVE) verify $(DEFAULT_MODEL)/bundle

# ONNX Runtime CPU against PyTorch eager on the shipped model (figures in the README).
bench-inference: setup
	$(PY) benchmarks/inference.py --checkpoint $(DEFAULT_MODEL)/checkpoint.pt --bundle $(DEFAULT_MODEL)/bundle \
		--out runs/inference_benchmark.json

clean:
	rm -rf runs/demo .pytest_cache
