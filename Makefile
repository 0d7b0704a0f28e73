# RapidMQ Edge — developer and CI entry points (GNU make, Debian, no stdin needed).
#
#   make run               set up .venv and run the gateway with embedded defaults
#   make run CONFIG=FILE   ... with a configuration file
#   make test              system deps + venv + lint + pytest (what CI runs)
#   make lint | bench | clean | distclean

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.stamp
CONFIG ?=
PYTEST_ARGS ?=

# Only lint the source trees that exist (an empty directory is not kept by git).
LINT_PATHS := $(wildcard rapidmq_edge tests bench firmware_sim)

# Debian packages providing the external peers used by the interop tests, and what builds
# the optional C accelerator (rapidmq_edge/crypto/_fastpath.c: a compiler, OpenSSL headers).
APT_PACKAGES := mosquitto mosquitto-clients libcoap3-bin nats-server gcc libssl-dev
# /metrics is checked by promtool and scraped by a real Prometheus; the systemd unit by
# systemd-analyze verify (issue 15)
APT_PACKAGES += prometheus systemd
# the dashboard's browser test: headless Chromium driven through its chromedriver (issue 15)
APT_PACKAGES += chromium chromium-driver
# the cloud consumers' sink: tests start their own PostgreSQL server (issue 16)
APT_PACKAGES += postgresql

.PHONY: help venv system-deps run lint test bench models clean distclean soak

help:
	@echo "targets: run [CONFIG=FILE], test, lint, bench, venv, system-deps, clean, distclean"

# ------------------------------------------------------------------ virtualenv
venv: $(STAMP)

# Re-installs whenever pyproject.toml is newer than the stamp.
$(STAMP): pyproject.toml setup.py rapidmq_edge/crypto/_fastpath.c \
          rapidmq_edge/intelligence/_detectorstep.c rapidmq_edge/intelligence/_residualstep.c \
          rapidmq_edge/mqtt/_framing.c
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev]'
	@touch $@

# ------------------------------------------------------------------ system deps
# Installs the Debian packages only when one of the commands is missing.
system-deps:
	@missing=""; \
	test -x /usr/sbin/mosquitto || missing="$$missing mosquitto"; \
	for c in mosquitto_pub mosquitto_sub coap-client-notls nats-server gcc prometheus promtool \
	         systemd-analyze chromium chromedriver; do \
	    command -v $$c >/dev/null 2>&1 || missing="$$missing $$c"; \
	done; \
	test -f /usr/include/openssl/evp.h || missing="$$missing libssl-dev"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	extra=""; \
	$(PYTHON) -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
	    || { missing="$$missing python3-dev"; extra="python3-dev"; }; \
	if [ -z "$$missing" ]; then \
	    echo "system-deps: all present"; exit 0; \
	fi; \
	echo "system-deps: missing:$$missing"; \
	if [ "$$(id -u)" != "0" ]; then \
	    echo "system-deps: not root; install them with:" >&2; \
	    echo "    sudo apt-get update && sudo apt-get install -y $(APT_PACKAGES) $$extra" >&2; \
	    exit 1; \
	fi; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get update -q || { sleep 5; apt-get update -q; }; \
	apt-get install -y -q --no-install-recommends $(APT_PACKAGES) $$extra; \
	for s in mosquitto nats-server prometheus postgresql; do \
	    if command -v service >/dev/null 2>&1 && service $$s status >/dev/null 2>&1; then \
	        echo "system-deps: stopping system $$s service"; \
	        service $$s stop >/dev/null 2>&1 || true; \
	    fi; \
	done; \
	if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then \
	    systemctl disable --now mosquitto nats-server prometheus postgresql >/dev/null 2>&1 || true; \
	fi; \
	for c in /usr/sbin/mosquitto mosquitto_pub mosquitto_sub coap-client-notls nats-server \
	         prometheus promtool systemd-analyze chromium chromedriver; do \
	    command -v $$c >/dev/null 2>&1 || { echo "system-deps: $$c still missing" >&2; exit 1; }; \
	done

# ------------------------------------------------------------------ run
run: venv
	@echo "make run: the commands are in $(VENV)/bin (. $(VENV)/bin/activate puts rapidmq-edge on PATH);"
	@echo "          the log goes to this terminal ([log] file = ... in a config for a file); Ctrl-C stops."
	$(VENV)/bin/rapidmq-edge run $(if $(CONFIG),--config $(CONFIG))

# ------------------------------------------------------------------ checks
lint: venv
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/mypy rapidmq_edge

# lint runs first (as a prerequisite) so pytest's summary line is the last thing printed.
test: system-deps venv lint
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

bench: venv
	$(PY) bench/mqtt_throughput.py

# ------------------------------------------------------------------ fuzzing
# Each fuzzer of fuzz/ runs FUZZ_SECONDS (one after the other) from its committed corpus, in
# a scratch copy; one JSON summary line per target (fuzz/README.md). CI only replays the
# corpora (tests/test_fuzz_corpus.py). FUZZ_ARGS: e.g. "--skip-pending coap cose".
FUZZ_SECONDS ?= 60
FUZZ_ARGS ?=

.PHONY: fuzz
fuzz: venv
	@$(PY) -c 'import atheris' 2>/dev/null || $(PY) -m pip install --disable-pip-version-check -q atheris
	FUZZ_SECONDS=$(FUZZ_SECONDS) $(PY) -m fuzz.run $(FUZZ_ARGS)

# ------------------------------------------------------------------ models
# Reproducible training of the shipped ONNX models (models/*.onnx, *.json, *.md) from
# simulator runs generated in-process; needs the `train` extra (scikit-learn, skl2onnx).
models: venv
	$(PY) -m pip install --disable-pip-version-check -q -e '.[train]'
	$(PY) models/train.py

# ------------------------------------------------------------------ cleanup
# `clean` keeps .venv and data/ (the gateway's state); `distclean` also drops .venv.
clean:
	rm -rf build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)

# ------------------------------------------------------------------ soak
# Issue 12: the gateway under 1,000 msg/s from 200 devices for SOAK_MINUTES (default 30),
# upstream link cut 60 s every 5 min, kill -9 every 10 min; prints JSON (bench/soak.py).
soak: venv
	$(PY) bench/soak.py --minutes $(or $(SOAK_MINUTES),30) $(SOAK_ARGS)
