# Two commands for a new user: `make demo` and `make test`. Each sets up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
# CPU build of torch (on this machine a wheel on disk); GPU users: see README "Installing on a GPU".
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test lint lab voila notebooks bench clean browser-deps

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[all]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/workbench demo

lint: $(STAMP)
	$(VENV)/bin/ruff check workbench tests benchmarks scripts notebooks

test: $(STAMP) browser-deps
	$(VENV)/bin/ruff check workbench tests benchmarks scripts notebooks
	$(PY) -m pytest -q

# Debian's chromium for the real-browser notebook test (never a downloaded browser).
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "warning: could not install chromium; the browser test will be skipped"; \
	  else echo "note: chromium not installed; the browser test will be skipped"; fi; }

# Jupyter refuses to start as root unless told; containers often run as root.
ROOT_FLAG = $(if $(filter 0,$(shell id -u)),--allow-root,)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/ $(ROOT_FLAG)

# Voila offline: the repo's template share/jupyter/voila/templates/workbench is Voila's lab
# template without its CDN stylesheet links (Font Awesome ships in Voila's bundle), and "null"
# MathJax settings keep the page from fetching MathJax from cdnjs.
VOILA_OFFLINE = --template=workbench --Voila.mathjax_url=null --Voila.mathjax_config=null
VOILA_PATH = JUPYTER_PATH=$(CURDIR)/share/jupyter$${JUPYTER_PATH:+:$$JUPYTER_PATH}

voila: $(STAMP)
	$(VOILA_PATH) $(VENV)/bin/voila notebooks/ $(VOILA_OFFLINE)

# The .ipynb are generated from the jupytext sources notebooks/NN_name.py (edit those).
notebooks: $(STAMP)
	$(PY) scripts/make_notebooks.py

bench: $(STAMP)
	$(PY) benchmarks/moe_forward.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
