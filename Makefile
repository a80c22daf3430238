# The two README commands. Both set up .venv themselves and reinstall only when setup.cfg changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP_FLAGS := -q --disable-pip-version-check

.PHONY: test demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-test: setup.cfg pyproject.toml | $(PY)
	$(PY) -m pip install $(PIP_FLAGS) -e '.[test]'
	touch $@

$(VENV)/.installed: setup.cfg pyproject.toml | $(PY)
	$(PY) -m pip install $(PIP_FLAGS) -e .
	touch $@

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

demo: $(VENV)/.installed
	$(PY) tools/demo.py

clean:
	rm -rf $(VENV) build *.egg-info
