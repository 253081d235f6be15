# The shared habits: make run, make test, make lint, make bench.
# Every target sets up what it needs: a virtual environment in .venv with the package and its extras.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench setup sysdeps clean compile uncompile

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)
	@if [ "$(COMPILE)" = 1 ]; then $(MAKE) --no-print-directory compile; fi

# Optional (`make compile`, or `COMPILE=1 make setup`): the codec's parser and the splice relay's
# hot path compiled with mypyc, in place, as extension modules next to their .py files, which stay
# the source and the fallback (`make uncompile` goes back to pure Python). Needs a C compiler and
# the Python headers. An edited .py is NOT picked up until `make compile` runs again: the test
# suite stops at start when a compiled module is older than its source (tests/conftest.py).
COMPILED := l4lb/proxy_protocol/parse.py l4lb/proxy_protocol/v1.py l4lb/proxy_protocol/v2.py \
	l4lb/proxy_protocol/tlv.py l4lb/balancer/splice.py l4lb/balancer/poller.py

compile: $(STAMP) uncompile
	cd src && ../$(BIN)/mypyc $(COMPILED) >/dev/null
	rm -rf src/build

uncompile:
	rm -rf src/build src/*__mypyc*.so $(foreach m,$(COMPILED),src/$(basename $(m)).*.so)

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

run: $(STAMP)
	$(BIN)/l4lb demo

test: $(STAMP) sysdeps
	$(BIN)/pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples
	$(BIN)/mypy --strict src

bench: $(STAMP) sysdeps
	$(BIN)/python bench/codec.py
	$(BIN)/python bench/cidr.py
	$(BIN)/python bench/run.py

clean: uncompile
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
