# The two commands the README leads with: `make demo` and `make test`.
# Each creates .venv when missing and installs what it needs.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.xvr-node-installed
DEMO_DIR ?= demo-output

.PHONY: demo test lint system-tools clean

demo: $(STAMP)
	$(BIN)/xvr-node demo --output $(DEMO_DIR)

test: $(STAMP) system-tools
	$(BIN)/ruff check .
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .

# Debian tools the tests use as real peers (DCMTK, dicom3tools, Orthanc, PostgreSQL).
system-tools:
	bash scripts/install-system-tools.sh

# torch and torchvision come from PyPI as the matched pair pinned in constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt torch torchvision
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/python -c "import torch, torchvision, timm, diffdrr, nanodrr; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $@

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .ruff_cache
