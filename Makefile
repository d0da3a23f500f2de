# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv when missing, installs the
# project into it, makes sure the embedded Fashion-MNIST data is present, then runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST_DIR ?= $(or $(FASHION_MNIST_DIR),/usr/share/datasets/fashion-mnist)
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test data venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PINS) -e '.[test,timm,openvino,hf]'
	touch $(STAMP)

data:
	@if [ -f "$(FMNIST_DIR)/t10k-labels-idx1-ubyte.gz" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian package dataset-fashion-mnist"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "error: Fashion-MNIST not found in $(FMNIST_DIR); fix: run 'sudo apt-get install dataset-fashion-mnist' or set FASHION_MNIST_DIR to a folder with the four idx .gz files" >&2; \
		exit 2; \
	fi

demo: venv data
	$(PY) -m compress.recipe fmnist_jbr --out runs/fmnist_jbr --overwrite

test: venv data
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
