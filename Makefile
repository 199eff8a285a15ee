# protoserve: every set-up step lives here; `make demo` and `make test` do all of it.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PROTOSERVE := $(VENV)/bin/protoserve

# The data root: ../shared/data/mnist when it exists, else $PROTOSERVE_DATA_ROOT, else data/mnist in
# the checkout (where `make data` downloads MNIST; tests/conftest.py looks in the same places).
SHARED_MNIST := $(wildcard $(CURDIR)/../shared/data/mnist)
export PROTOSERVE_DATA_ROOT := $(if $(SHARED_MNIST),$(abspath $(SHARED_MNIST)),$(or $(PROTOSERVE_DATA_ROOT),$(CURDIR)/data/mnist))
MNIST_FILES := train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte

.PHONY: setup demo demo-protopnet test lint train-default bundle-default bench-inference clean demo-train serve prometheus data bench-serve train-protopnet evaluate-protopnet bundle-protopnet serve-protopnet

setup: $(VENV)/.installed

# The Open Inference Protocol clients of tests/service/test_open_inference.py, without their pins (the
# dev extra in pyproject.toml lists what their REST clients import).
OPEN_INFERENCE_CLIENTS := tritonclient==2.73.0 kserve==0.21.0

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[train,dev,batch,s3,outliers]"
	$(PY) -m pip install -q --no-deps $(OPEN_INFERENCE_CLIENTS)
	touch $@

# Main job: start the service on the shipped bundle, POST /predict and /explain, print the answer,
# write the explanation (input, reconstruction, top-3 prototypes) to runs/demo/explanation.png, stop.
demo: setup
	test -f $(DEFAULT_MODEL)/bundle/manifest.json || $(MAKE) bundle-default
	$(PROTOSERVE) demo --bundle $(DEFAULT_MODEL)/bundle --out runs/demo/explanation.png

# The same with the shipped ProtoPNet: "this looks like that" (patch, where it was found, its source).
demo-protopnet: setup
	$(PROTOSERVE) demo --bundle models/protopnet_mnist/bundle --out runs/demo/protopnet_explanation.png

# A short PrototypeDL training run and its pictures (the main job before the service).
demo-train: setup
	$(PROTOSERVE) train --config configs/prototypedl_mnist_demo.yaml --out runs/demo $$(test -f runs/demo/last.pt && echo --resume)
	$(PROTOSERVE) evaluate --checkpoint runs/demo/best.pt
	$(PROTOSERVE) visualize --checkpoint runs/demo/best.pt --out runs/demo/pictures

# Serve the shipped bundle on port 3000 until Ctrl+C (`protoserve serve --help` for options).
serve: setup
	$(PROTOSERVE) serve --bundle $(DEFAULT_MODEL)/bundle

# The tests: `make test` runs all but the slow end-to-end cases (pytest's `slow` mark: whole jobs,
# servers started per case, browser runs), `make test-slow` those; CI (.ci/run) runs both.
.PHONY: test-slow
test: setup lint prometheus pushgateway postgresql data review-browser
	$(VENV)/bin/pytest -m "not slow"

test-slow: setup prometheus pushgateway postgresql data review-browser
	$(VENV)/bin/pytest -m slow

# MNIST under the data root: when any IDX file is missing, fetched once with torchvision's downloader
# (md5 of every archive and file checked); when that fails, one line says what is missing and how to get it.
data: setup
	@missing=; for f in $(MNIST_FILES); do \
		ls "$$PROTOSERVE_DATA_ROOT/$$f" "$$PROTOSERVE_DATA_ROOT/$$f.gz" "$$PROTOSERVE_DATA_ROOT/MNIST/raw/$$f" \
			"$$PROTOSERVE_DATA_ROOT/MNIST/raw/$$f.gz" 2>/dev/null | grep -q . || missing="$$missing $$f"; done; \
	test -z "$$missing" || { echo "MNIST missing under $$PROTOSERVE_DATA_ROOT:$$missing; downloading it once"; \
		$(PROTOSERVE) download --data-root "$$PROTOSERVE_DATA_ROOT" >/dev/null || { echo "make data: MNIST is \
	missing under $$PROTOSERVE_DATA_ROOT and the download failed: put the four IDX files there (or in \
	../shared/data/mnist) or set PROTOSERVE_DATA_ROOT to a folder holding them" >&2; exit 2; }; }

# Prometheus and promtool for the monitoring tests (Debian package), installed only when missing.
SUDO := $(shell test "$$(id -u)" = 0 || echo sudo)
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
		{ $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q prometheus; }

# The Prometheus Pushgateway for the batch-job metrics test (protoserve score --pushgateway).
.PHONY: pushgateway
pushgateway:
	@command -v prometheus-pushgateway >/dev/null || \
		{ $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q prometheus-pushgateway; }

# PostgreSQL's server binaries (Debian package) for the registry tests on PostgreSQL, which start their own
# server (registry/local_postgres.py); Debian keeps them off the PATH, in /usr/lib/postgresql/<major>/bin.
.PHONY: postgresql
postgresql:
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q postgresql; }

# ruff, then the layering contracts of ../shared/ARCHITECTURE.md (pyproject.toml [tool.importlinter]).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# The shipped default model, 2.0.0 (models/prototypedl_mnist_headline): the headline schedule over 200
# epochs under seed 8, one thread (about 65 minutes), resumable; shipped as its best validation epoch
# (docs/runs/prototypedl_headline_seeds8_9_rule_2026-12-05.md), then evaluated and drawn.
DEFAULT_MODEL := models/prototypedl_mnist_headline
DEFAULT_RUN := runs/headline_seed8
train-default: setup
	$(PROTOSERVE) train --config configs/prototypedl_mnist_headline.yaml --seed 8 --out $(DEFAULT_RUN) \
		$$(test -f $(DEFAULT_RUN)/last.pt && echo --resume)
	$(PROTOSERVE) ship --run $(DEFAULT_RUN) --out $(DEFAULT_MODEL)
	$(PROTOSERVE) evaluate --checkpoint $(DEFAULT_MODEL)/checkpoint.pt --out $(DEFAULT_MODEL)/evaluation.json
	$(PROTOSERVE) visualize --checkpoint $(DEFAULT_MODEL)/checkpoint.pt --out $(DEFAULT_MODEL)/pictures

# The first default model, 1.0.0 (models/prototypedl_mnist, the parent of 2.0.0), resumable.
PROTOTYPEDL_1 := models/prototypedl_mnist
.PHONY: train-1.0.0 bundle-1.0.0
train-1.0.0: setup
	$(PROTOSERVE) train --config configs/prototypedl_mnist_fast.yaml --out runs/prototypedl_mnist_fast $$(test -f runs/prototypedl_mnist_fast/last.pt && echo --resume)

bundle-1.0.0: setup
	$(PROTOSERVE) export --checkpoint $(PROTOTYPEDL_1)/checkpoint.pt --out $(PROTOTYPEDL_1)/bundle \
		--name prototypedl-mnist --version 1.0.0 $$(test -d $(PROTOTYPEDL_1)/bundle && echo --force)
	$(PROTOSERVE) verify $(PROTOTYPEDL_1)/bundle

# The paper's 99.22% within a fixed budget (configs/prototypedl_mnist_headline.yaml), resumable.
.PHONY: train-headline bench-ablation
HEADLINE_RUN := runs/prototypedl_mnist_headline
train-headline: setup
	$(PROTOSERVE) train --config configs/prototypedl_mnist_headline.yaml --out $(HEADLINE_RUN) $$(test -f $(HEADLINE_RUN)/last.pt && echo --resume)
	$(PROTOSERVE) evaluate --checkpoint $(HEADLINE_RUN)/best.pt --out $(HEADLINE_RUN)/evaluation.json

# The paper's ablation on the paper's number of steps (configs/prototypedl_mnist_headline_steps.yaml):
# 3 variants x 2 seeds, two runs at a time, resumable; the table and docs/ablation_steps_accuracy_vs_time.png.
bench-ablation: setup
	$(PY) benchmarks/ablation.py --base configs/prototypedl_mnist_headline_steps.yaml --seeds 0 1 --jobs 2 \
		--out runs/ablation_steps --png docs/ablation_steps_accuracy_vs_time.png

# The shipped bundle (served without training): ONNX graphs, manifest, prototype pictures, from
# the shipped checkpoint; export checks parity on the whole test set and refuses on a miss.
bundle-default: setup
	$(PROTOSERVE) export --checkpoint $(DEFAULT_MODEL)/checkpoint.pt --out $(DEFAULT_MODEL)/bundle \
		--name prototypedl-mnist --version 2.0.0 --parent $(PROTOTYPEDL_1)/bundle \
		$$(test -d $(DEFAULT_MODEL)/bundle && echo --force)
	$(PROTOSERVE) verify $(DEFAULT_MODEL)/bundle

# ONNX Runtime CPU against PyTorch eager on the shipped model (figures in docs/results.md).
bench-inference: setup
	$(PY) benchmarks/inference_speed.py --checkpoint $(DEFAULT_MODEL)/checkpoint.pt --bundle $(DEFAULT_MODEL)/bundle \
		--out runs/inference_benchmark.json

# Serving latency and throughput: protoserve against the raw ORT session and a naive FastAPI +
# PyTorch server, concurrency 1, 8, 64 (figures in docs/results.md).
bench-serve: setup
	$(PY) benchmarks/serve.py --bundle $(DEFAULT_MODEL)/bundle --checkpoint $(DEFAULT_MODEL)/checkpoint.pt \
		--out runs/serve_benchmark.json --sweep

# Batch scoring: `protoserve score` against the raw ONNX Runtime session on the 70,000 MNIST images,
# and peak memory at 10k, 100k and 1M generated images (figures and run time in docs/results.md); then the
# throughput alone on the shipped ProtoPNet, whose heavier session leaves the job's own work a smaller share.
.PHONY: bench-score
bench-score: setup
	$(PY) benchmarks/score.py --bundle $(DEFAULT_MODEL)/bundle --out runs/score_benchmark.json
	$(PY) benchmarks/score.py --bundle $(PROTOPNET_MODEL)/bundle --skip-memory --out runs/score_benchmark_protopnet.json

# Knowing when not to answer: the bundles' calibrated out-of-domain score against max-softmax and energy
# on out-of-domain sets built here, and photo-like uploads with and without canonicalize (docs/results.md; ~1 min).
.PHONY: bench-ood
bench-ood: setup
	$(PY) -m benchmarks.ood --bundles $(DEFAULT_MODEL)/bundle models/protopnet_mnist/bundle --out runs/ood_benchmark.json
	$(PY) -m benchmarks.ood_cost --bundles $(DEFAULT_MODEL)/bundle models/protopnet_mnist/bundle

# Why the glyph target is missed: the single-stroke symbols under every layer of both shipped
# checkpoints and in pixel space (docs/results.md; a few minutes).
.PHONY: bench-ood-glyphs
bench-ood-glyphs: setup
	$(PY) -m benchmarks.ood_glyphs --checkpoints $(DEFAULT_MODEL)/checkpoint.pt models/protopnet_mnist/checkpoint.pt

# Outlier exposure (docs/outlier_exposure.md): a short fine-tune of each shipped model with the margin
# term on non-digit outliers (configs/*_oe.yaml), resumable (run again after an interruption); each
# bundle is exported from the last epoch into the run, with the shipped bundle as its parent; then
# bench-ood on the shipped and fine-tuned bundles in one run (figures in docs/results.md).
OE_PROTOTYPEDL := runs/oe_prototypedl
OE_PROTOPNET := runs/oe_protopnet
.PHONY: finetune-oe bench-ood-oe
finetune-oe: setup
	$(PROTOSERVE) train --config configs/prototypedl_mnist_oe.yaml --out $(OE_PROTOTYPEDL) $$(test -f $(OE_PROTOTYPEDL)/last.pt && echo --resume)
	$(PROTOSERVE) export --checkpoint $(OE_PROTOTYPEDL)/last.pt --out $(OE_PROTOTYPEDL)/bundle --name prototypedl-mnist \
		--version 1.1.0 --parent $(PROTOTYPEDL_1)/bundle $$(test -d $(OE_PROTOTYPEDL)/bundle && echo --force)
	$(PROTOSERVE) train --config configs/protopnet_mnist_oe.yaml --out $(OE_PROTOPNET) $$(test -f $(OE_PROTOPNET)/last.pt && echo --resume)
	$(PROTOSERVE) export --checkpoint $(OE_PROTOPNET)/last.pt --out $(OE_PROTOPNET)/bundle --name protopnet-mnist \
		--version 1.1.0 --parent $(PROTOPNET_MODEL)/bundle $$(test -d $(OE_PROTOPNET)/bundle && echo --force)

bench-ood-oe: setup
	$(PY) -m benchmarks.ood --bundles $(PROTOTYPEDL_1)/bundle $(OE_PROTOTYPEDL)/bundle models/protopnet_mnist/bundle \
		$(OE_PROTOPNET)/bundle --out runs/ood_benchmark_oe.json

# Outlier exposure from the start of training (docs/results.md#outlier-exposure-from-the-start): each family
# trained with the term in every step, a fixed margin (pull_digits false) and, for ProtoPNet, the outliers
# in the digits' batch; resumable; exported from the best validation epoch with the shipped bundle as its
# parent; then bench-ood on the four bundles in one run.
OE_START_PROTOTYPEDL := runs/headline_oefixed_seed8
OE_START_PROTOPNET := runs/protopnet_oe_start
.PHONY: train-oe-start bench-ood-oe-start
train-oe-start: setup
	$(PROTOSERVE) train --config configs/prototypedl_mnist_headline_oe_fixed_margin.yaml --seed 8 --epochs 150 \
		--out $(OE_START_PROTOTYPEDL) $$(test -f $(OE_START_PROTOTYPEDL)/last.pt && echo --resume)
	$(PROTOSERVE) export --checkpoint $(OE_START_PROTOTYPEDL)/best.pt --out $(OE_START_PROTOTYPEDL)/bundle \
		--name prototypedl-mnist --version 2.1.0 --parent $(DEFAULT_MODEL)/bundle $$(test -d $(OE_START_PROTOTYPEDL)/bundle && echo --force)
	$(PROTOSERVE) train --config configs/protopnet_mnist_oe_start.yaml --threads 1 \
		--out $(OE_START_PROTOPNET) $$(test -f $(OE_START_PROTOPNET)/last.pt && echo --resume)
	$(PROTOSERVE) export --checkpoint $(OE_START_PROTOPNET)/best.pt --out $(OE_START_PROTOPNET)/bundle \
		--name protopnet-mnist --version 1.1.0 --parent $(PROTOPNET_MODEL)/bundle $$(test -d $(OE_START_PROTOPNET)/bundle && echo --force)

bench-ood-oe-start: setup
	$(PY) -m benchmarks.ood --bundles $(DEFAULT_MODEL)/bundle $(OE_START_PROTOTYPEDL)/bundle models/protopnet_mnist/bundle \
		$(OE_START_PROTOPNET)/bundle --out runs/ood_benchmark_oe_start.json

# The outlier-exposure candidates (issue 23, docs/outlier_exposure.md): each family trained with the term from
# the start (weight 0.3, fixed margin), the run picked among seeds on validation by a rule set before it was
# known (docs/runs/outlier_exposure_candidates_rule_2026-12-05.md); resumable; shipped into models/*_oe, exported
# with the shipped bundle as its parent, calibrated as every bundle. They are candidates, not the default:
# `make register-oe` registers each beside its parent (the parent active), ready to promote.
OE_MODEL_PROTOTYPEDL := models/prototypedl_mnist_oe
OE_MODEL_PROTOPNET := models/protopnet_mnist_oe
OE_RUN_PROTOTYPEDL := runs/headline_oefixed03_200ep_seed9
OE_VERSION_PROTOTYPEDL := 2.1.5
OE_RUN_PROTOPNET := runs/protopnet_oe_start_seed2
.PHONY: ship-oe register-oe
ship-oe: setup
	$(PROTOSERVE) train --config configs/prototypedl_mnist_headline_oe_fixed_margin.yaml --seed 9 --outlier-exposure 0.3 \
		--threads 1 --out $(OE_RUN_PROTOTYPEDL) $$(test -f $(OE_RUN_PROTOTYPEDL)/last.pt && echo --resume)
	$(PROTOSERVE) ship --run $(OE_RUN_PROTOTYPEDL) --out $(OE_MODEL_PROTOTYPEDL)
	$(PROTOSERVE) evaluate --checkpoint $(OE_MODEL_PROTOTYPEDL)/checkpoint.pt --out $(OE_MODEL_PROTOTYPEDL)/evaluation.json
	$(PROTOSERVE) export --checkpoint $(OE_MODEL_PROTOTYPEDL)/checkpoint.pt --out $(OE_MODEL_PROTOTYPEDL)/bundle \
		--name prototypedl-mnist --version $(OE_VERSION_PROTOTYPEDL) --parent $(DEFAULT_MODEL)/bundle $$(test -d $(OE_MODEL_PROTOTYPEDL)/bundle && echo --force)
	$(PROTOSERVE) verify $(OE_MODEL_PROTOTYPEDL)/bundle
	$(PROTOSERVE) visualize --checkpoint $(OE_MODEL_PROTOTYPEDL)/checkpoint.pt --out $(OE_MODEL_PROTOTYPEDL)/pictures
	$(PROTOSERVE) train --config configs/protopnet_mnist_oe_start.yaml --seed 2 --threads 1 \
		--out $(OE_RUN_PROTOPNET) $$(test -f $(OE_RUN_PROTOPNET)/last.pt && echo --resume)
	$(PROTOSERVE) ship --run $(OE_RUN_PROTOPNET) --out $(OE_MODEL_PROTOPNET)
	$(PROTOSERVE) evaluate --checkpoint $(OE_MODEL_PROTOPNET)/checkpoint.pt --out $(OE_MODEL_PROTOPNET)/evaluation.json
	$(PROTOSERVE) export --checkpoint $(OE_MODEL_PROTOPNET)/checkpoint.pt --out $(OE_MODEL_PROTOPNET)/bundle \
		--name protopnet-mnist --version 1.1.2 --parent $(PROTOPNET_MODEL)/bundle $$(test -d $(OE_MODEL_PROTOPNET)/bundle && echo --force)
	$(PROTOSERVE) verify $(OE_MODEL_PROTOPNET)/bundle

# Each candidate registered beside its parent (status "candidate"; "released" once promoted; and 2.0.0's parent 1.0.0): PrototypeDL in $(OE_REGISTRY_PROTOTYPEDL) (serve it with
# `protoserve serve --registry ...`), ProtoPNet in the review loop's registry (`make review` shows it on the page,
# with its outlier figures and a promote button), each version with its prototypes' nearest training images for
# the review page (about 15 s a version, once). Run again, it registers and computes nothing twice.
OE_REGISTRY_PROTOTYPEDL := runs/registry_prototypedl
REVIEW_REGISTRY := runs/review/registry
register-oe: setup
	$(PROTOSERVE) registry --registry $(OE_REGISTRY_PROTOTYPEDL) register $(PROTOTYPEDL_1)/bundle \
		--checkpoint $(PROTOTYPEDL_1)/checkpoint.pt --if-missing
	$(PROTOSERVE) registry --registry $(OE_REGISTRY_PROTOTYPEDL) register $(DEFAULT_MODEL)/bundle \
		--checkpoint $(DEFAULT_MODEL)/checkpoint.pt --promote --if-missing
	$(PROTOSERVE) registry --registry $(OE_REGISTRY_PROTOTYPEDL) register $(OE_MODEL_PROTOTYPEDL)/bundle \
		--checkpoint $(OE_MODEL_PROTOTYPEDL)/checkpoint.pt --candidate --if-missing
	$(PROTOSERVE) registry --registry $(REVIEW_REGISTRY) register $(PROTOPNET_MODEL)/bundle \
		--checkpoint $(PROTOPNET_MODEL)/checkpoint.pt --promote --if-missing
	$(PROTOSERVE) registry --registry $(REVIEW_REGISTRY) register $(OE_MODEL_PROTOPNET)/bundle \
		--checkpoint $(OE_MODEL_PROTOPNET)/checkpoint.pt --candidate --if-missing
	for v in 2.0.0 $(OE_VERSION_PROTOTYPEDL); do test -f $(OE_REGISTRY_PROTOTYPEDL)/versions/$$v/neighbours.json || \
		$(PROTOSERVE) registry --registry $(OE_REGISTRY_PROTOTYPEDL) neighbours $$v || exit 1; done
	for v in 1.0.0 1.1.2; do test -f $(REVIEW_REGISTRY)/versions/$$v/neighbours.json || \
		$(PROTOSERVE) registry --registry $(REVIEW_REGISTRY) neighbours $$v || exit 1; done
	$(PROTOSERVE) registry --registry $(OE_REGISTRY_PROTOTYPEDL) list
	$(PROTOSERVE) registry --registry $(REVIEW_REGISTRY) list

# bench-ood on the shipped bundles and the candidates in one run: each candidate also held to its parent.
.PHONY: bench-ood-candidates
bench-ood-candidates: setup
	$(PY) -m benchmarks.ood --bundles $(DEFAULT_MODEL)/bundle $(OE_MODEL_PROTOTYPEDL)/bundle $(PROTOPNET_MODEL)/bundle \
		$(OE_MODEL_PROTOPNET)/bundle --out runs/ood_benchmark_candidates.json

clean:
	rm -rf runs/demo .pytest_cache

# The shipped ProtoPNet (models/protopnet_mnist; its training time is in the README results), resumable
# (run again after an interruption); then the checkpoint, config, metrics and push pictures are
# copied into models/protopnet_mnist/.
PROTOPNET_RUN := runs/protopnet_mnist
PROTOPNET_MODEL := models/protopnet_mnist
train-protopnet: setup
	$(PROTOSERVE) train --config configs/protopnet_mnist.yaml --out $(PROTOPNET_RUN) $$(test -f $(PROTOPNET_RUN)/last.pt && echo --resume)
	$(PROTOSERVE) ship --run $(PROTOPNET_RUN) --out $(PROTOPNET_MODEL)

evaluate-protopnet: setup
	$(PROTOSERVE) evaluate --checkpoint $(PROTOPNET_MODEL)/checkpoint.pt --out $(PROTOPNET_MODEL)/evaluation.json

# Its bundle, beside the PrototypeDL one; `make serve-protopnet` serves it (the service reads the
# bundle from --bundle / $PROTOSERVE_BUNDLE, so either family is chosen by configuration).
bundle-protopnet: setup
	$(PROTOSERVE) export --checkpoint $(PROTOPNET_MODEL)/checkpoint.pt --out $(PROTOPNET_MODEL)/bundle \
		--name protopnet-mnist --version 1.0.0 $$(test -d $(PROTOPNET_MODEL)/bundle && echo --force)
	$(PROTOSERVE) verify $(PROTOPNET_MODEL)/bundle

serve-protopnet: setup
	$(PROTOSERVE) serve --bundle $(PROTOPNET_MODEL)/bundle

# The review loop on the shipped ProtoPNet: a registry in runs/review/registry, the service following its
# active version, and a revision worker; prints the page's address and the admin key. Ctrl+C stops it.
.PHONY: review
review: setup
	$(PROTOSERVE) review --bundle $(PROTOPNET_MODEL)/bundle --checkpoint $(PROTOPNET_MODEL)/checkpoint.pt

# The deployment of docs/deployment.md on this machine: PostgreSQL, an S3 server, two service replicas, two
# revision workers and a two-node Ray cluster; a promote followed by both replicas, a batch job on Ray; all stopped.
.PHONY: cluster-demo
cluster-demo: setup postgresql
	$(PY) -m cli.cluster_demo

# Headless Chromium and its driver for the review page's browser test (Debian packages), when missing.
.PHONY: review-browser
review-browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium chromium-driver; }
