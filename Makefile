# The two README commands. Both set up .venv themselves and reinstall only when setup.cfg changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP_FLAGS := -q --disable-pip-version-check

.PHONY: test demo original clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-test: setup.cfg pyproject.toml | $(PY)
	$(PY) -m pip install $(PIP_FLAGS) -e '.[test,onnx,plot]'
	touch $@

$(VENV)/.installed-plot: setup.cfg pyproject.toml | $(PY)
	$(PY) -m pip install $(PIP_FLAGS) -e '.[plot]'
	touch $@

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

# Fashion-MNIST from Debian's dataset-fashion-mnist where apt can install it, else torchvision's download.
demo: $(VENV)/.installed-plot
	@[ -d /usr/share/datasets/fashion-mnist ] || ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] || \
		(apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) || true
	$(PY) tools/demo.py

# Rebuild the demo's shipped original (assets/fashion-mnist-vit.pth) from scratch: about 25 minutes on 2 cores.
original: $(VENV)/.installed-plot
	$(PY) tools/demo.py --train-original

clean:
	rm -rf $(VENV) build *.egg-info
