# One-command set-up on a fresh machine: `make demo` runs the main job, `make test` runs the tests.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
STAMP := .setup.stamp
FASHION := /usr/share/datasets/fashion-mnist

.PHONY: setup data test lint demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PIP) install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

data:
	@if [ ! -f $(FASHION)/train-images-idx3-ubyte.gz ] && [ -z "$$QCNN_DATA" ]; then \
	  echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	  (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null; \
	fi

test: setup data
	$(PYTHON) -m pytest -q -p no:cacheprovider tests

lint: setup
	$(PYTHON) -m ruff check qcnn tests benchmarks

demo: setup data
	$(PYTHON) -m qcnn bench --suite demo --out demo_out
	$(PYTHON) -m qcnn report demo_out/cells/lsq@4-4 --dataset fashion-mnist

bench: setup data
	$(PYTHON) benchmarks/quantizer_kernels.py --out benchmarks/results
	$(PYTHON) benchmarks/qat_step_time.py --out benchmarks/results
	$(PYTHON) benchmarks/int8_speed.py --out benchmarks/results

clean:
	rm -rf $(STAMP) demo_out .pytest_cache
