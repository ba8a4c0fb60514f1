# Two entry points: `make demo` (the main job end to end) and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision pinned to the builds that pip finds on this machine's disk (no multi-GB download).
TORCH := torch==2.14.1 torchvision==0.29.1
DEMO_DIR := data/demo
OUT := runs/demo

.PHONY: demo test test-all lint bench notebook clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	# torch pinned again here: otherwise pip may resolve the extras against other torch releases (GBs of downloads).
	$(BIN)/pip install -q -e '.[test,notebook]' $(TORCH)
	touch $@

# The main job end to end: images -> feature stores -> classifiers (5-fold CV) -> predictions -> HTML report.
demo: $(VENV)/.installed
	$(BIN)/python data/make_demo.py $(DEMO_DIR)
	$(BIN)/embedfit extract $(DEMO_DIR)/train -o $(OUT)/train.h5
	$(BIN)/embedfit extract $(DEMO_DIR)/test -o $(OUT)/test.h5
	$(BIN)/embedfit fit $(OUT)/train.h5 --model logreg --model svm --model ridge --model knn
	$(BIN)/embedfit fit $(OUT)/train.h5 --model logreg --test-store $(OUT)/test.h5 -o runs/demo/logreg-holdout
	$(BIN)/embedfit predict runs/train-logreg $(DEMO_DIR)/new -o $(OUT)/new-predictions.csv
	$(BIN)/embedfit report runs/train-logreg runs/train-svm runs/train-ridge runs/train-knn -o $(OUT)/report.html
	@echo "demo done: open $(OUT)/report.html"

# The analysis notebook on your own store and run, executed with papermill into NB_OUT (and an HTML copy):
#   make notebook STORE=feats.h5 RUN=runs/feats-logreg
NB_OUT ?= runs/analysis.ipynb
notebook: $(VENV)/.installed
	@test -n "$(STORE)" && test -n "$(RUN)" || { echo "usage: make notebook STORE=feats.h5 RUN=runs/feats-logreg [NB_OUT=runs/analysis.ipynb]"; exit 2; }
	@mkdir -p $(dir $(NB_OUT))
	$(BIN)/papermill notebooks/analysis.ipynb $(NB_OUT) --cwd notebooks -p STORE $(abspath $(STORE)) -p RUN $(abspath $(RUN))
	$(BIN)/jupyter nbconvert --to html $(NB_OUT)
	@echo "notebook done: open $(NB_OUT:.ipynb=.html)"

# The fast tier (<= 5 minutes on an idle 2-core machine): the main job end to end and the quick checks.
test: $(VENV)/.installed
	$(BIN)/ruff check embedfit tests benchmarks data
	$(BIN)/python -m pytest -q -m "not slow"

# Every tier (what CI runs): kills, Ray clusters, S3, fine-tuning, foundation models, ONNX, benchmarks too.
test-all: $(VENV)/.installed
	$(BIN)/ruff check embedfit tests benchmarks data
	$(BIN)/python -m pytest -q

# The CPU benchmarks of benchmarks/README.md (about 30 minutes on 2 cores; results in benchmarks/results/).
bench: $(VENV)/.installed
	cd benchmarks && EMBEDFIT_OFFLINE=1 ../$(BIN)/python bench_extract.py --images 1000 --rounds 5 --ablations
	cd benchmarks && ../$(BIN)/python bench_fit.py --n 10000 --dim 1280
	cd benchmarks && ../$(BIN)/python bench_startup.py --repeats 5
	cd benchmarks && EMBEDFIT_OFFLINE=1 ../$(BIN)/python bench_memory.py --device cpu --counts 1000 10000

lint: $(VENV)/.installed
	$(BIN)/ruff check embedfit tests benchmarks data

clean:
	rm -rf runs $(DEMO_DIR)
