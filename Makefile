# `make demo` and `make test` set everything up on a fresh machine (venv, torch from the pinned wheels,
# the Fashion-MNIST Debian package when run as root) and then run.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
FMNIST := /usr/share/datasets/fashion-mnist
DEMO_DIR ?= out/demo
PYTEST_ARGS ?=

.PHONY: install data test demo clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

data:
	@if [ ! -f $(FMNIST)/t10k-images-idx3-ubyte.gz ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; fi

test: install data
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: install data
	$(VENV)/bin/cvconvert convert lenet --split paper --data fashion-mnist -o $(DEMO_DIR) --force

clean:
	rm -rf $(VENV) out .pytest_cache
