# Two commands do everything on a fresh machine: `make speedrun` (set up + main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup browser speedrun demo test test-slow bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# A CPU machine gets the CPU build of torch (an unpinned torch would pull CUDA); a GPU user's torch is left alone.
	$(PY) -m pip install -q --upgrade pip
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	  else $(PY) -m pip install -q torch==2.13.0; fi; \
	fi
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

# The main job: pretrain, SFT and GRPO on the built-in data in 30 minutes, with a report (README, "Speedrun").
speedrun: $(STAMP)
	$(VENV)/bin/nanoseek speedrun

demo: $(STAMP)
	$(VENV)/bin/nanoseek demo

# The chat page is tested in a real headless Chromium (Debian's package); installed here when we can.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "note: chromium is not installed, so the chat-page browser test will be skipped"

test: $(STAMP) browser
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
