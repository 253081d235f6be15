# The shared habits: make run, make test, make lint, make bench.
# Every target sets up what it needs: a virtual environment in .venv with the package and its extras.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench setup sysdeps clean compile uncompile build

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP) build

# The hot modules compiled with mypyc, by default: the codec's parser and a new connection's
# path, as listed in pyproject.toml's [tool.l4lb] compiled (the one list: setup.py compiles the
# same modules into the wheel, docs/install.md). Compiled in place, as extension modules next to
# their .py files, which stay the source and the fallback (Python imports an extension module
# before its .py). Needs a C compiler and the Python headers; without them the build says so in
# one line and stays pure Python.
# `COMPILE=0 make setup` (or test, run, bench) removes the build: pure Python; `make compile`
# forces a build (it fails without a compiler). The build is redone whenever one of these
# files (or this Makefile, or pyproject.toml) is newer than it, so every make target runs what
# the source says; the test suite refuses to start on a compiled module older than its .py
# (tests/conftest.py), for pytest run by hand after an edit. docs/performance.md has what each
# module saves.
COMPILE ?= 1
COMPILED := $(shell $(PY) -c 'import tomllib; \
	mods = tomllib.load(open("pyproject.toml", "rb"))["tool"]["l4lb"]["compiled"]; \
	print(*(m.replace(".", "/") + ".py" for m in mods))')
ifeq ($(strip $(COMPILED)),)
$(error no [tool.l4lb] compiled list read from pyproject.toml by $(PY) (Python 3.11 or later))
endif
BUILT := $(VENV)/.compiled
MYPYC_LOG := $(VENV)/mypyc.log
# Prints what is missing (and fails) when this venv's Python cannot build extension modules.
CAN_COMPILE := $(BIN)/python -c 'import os, shlex, shutil, sys, sysconfig; \
	cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")[0]; \
	inc = os.path.join(sysconfig.get_paths()["include"], "Python.h"); \
	missing = [m for m, ok in ((f"a C compiler ({cc})", shutil.which(cc)), \
	  (f"the Python headers ({inc})", os.path.exists(inc))) if not ok]; \
	print(" and ".join(missing), "missing"); sys.exit(bool(missing))'

ifeq ($(COMPILE),0)
build: uncompile
else
build: $(BUILT)
endif

$(BUILT): $(STAMP) $(addprefix src/,$(COMPILED)) Makefile pyproject.toml
	@if missing=$$($(CAN_COMPILE)); then \
	  $(MAKE) --no-print-directory compile; \
	else \
	  $(MAKE) --no-print-directory uncompile >/dev/null; \
	  echo "l4lb: pure Python, not compiled with mypyc: $$missing (e.g. apt-get install gcc python3-dev, then make setup)"; \
	fi

compile: $(STAMP) uncompile
	@echo "l4lb: compiling the hot modules with mypyc (about 20-50 s; COMPILE=0 for pure Python)"
	@cd src && ../$(BIN)/mypyc $(COMPILED) >../$(MYPYC_LOG) 2>&1 \
	  || { cat ../$(MYPYC_LOG); rm -rf build; echo "l4lb: mypyc failed (above); COMPILE=0 make setup runs pure Python"; exit 1; }
	rm -rf src/build
	touch $(BUILT)

# Every extension module under src, not only today's list: one left from a longer list (or
# another branch's) would shadow its .py.
uncompile:
	rm -rf src/build $(BUILT)
	find src -name '*.so' -delete

# System packages the tests and benchmarks talk to (real HAProxy and nginx, wrk, chromium;
# BIRD 2, nftables and conntrack for the anycast fleet test; logrotate and rsyslog for the log tests).
sysdeps:
	@if ! command -v haproxy >/dev/null || ! command -v nginx >/dev/null || ! command -v wrk >/dev/null \
	   || ! command -v chromium >/dev/null || [ ! -f /usr/lib/nginx/modules/ngx_stream_module.so ] || ! command -v openssl >/dev/null \
	   || ! command -v curl >/dev/null || ! command -v systemd-analyze >/dev/null || [ ! -x /bin/kill ] \
	   || ! command -v bird >/dev/null || ! command -v nft >/dev/null || ! command -v conntrack >/dev/null \
	   || ! command -v logrotate >/dev/null || [ ! -x /usr/sbin/rsyslogd ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    haproxy nginx libnginx-mod-stream wrk chromium iproute2 openssl systemd procps curl \
	    bird2 nftables conntrack logrotate rsyslog >/dev/null; \
	fi

run: setup
	$(BIN)/l4lb demo

test: setup sysdeps
	$(BIN)/pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples setup.py
	$(BIN)/ruff format --check src tests bench examples setup.py
	$(BIN)/mypy --strict src

bench: setup sysdeps
	$(BIN)/python bench/codec.py
	$(BIN)/python bench/cidr.py
	$(BIN)/python bench/run.py

clean: uncompile
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
