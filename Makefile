# terratile: the two commands of the README are `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?=
SCENE ?=
KEEP ?=

.PHONY: demo test lint typecheck docs system-deps venv clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[export,dev]'
	touch $(STAMP)

venv: $(STAMP)

# mosquitto is a real broker in the tests and the demo; systemd-analyze (Debian package
# 'systemd') checks the unit file; chromium + chromium-driver run the dashboard test in a
# real headless browser; gdalinfo (gdal-bin) and QGIS (python3-qgis, run offscreen; about
# 80 s to install) open the output maps as analysts do; nginx (nginx-light) serves COGs with
# byte ranges to the fleet tests. Installed from Debian if missing.
system-deps:
	@{ command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto; } \
	  && command -v mosquitto_sub >/dev/null 2>&1 \
	  && command -v systemd-analyze >/dev/null 2>&1 \
	  && command -v chromium >/dev/null 2>&1 \
	  && command -v chromedriver >/dev/null 2>&1 \
	  && command -v gdalinfo >/dev/null 2>&1 \
	  && { command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx; } \
	  && /usr/bin/python3 -c 'import qgis.core' >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  $$SUDO apt-get install -y -qq mosquitto mosquitto-clients systemd chromium \
	    chromium-driver gdal-bin nginx-light && \
	  $$SUDO apt-get install -y -qq --no-install-recommends python3-qgis qgis-providers; }

lint: venv
	$(BIN)/ruff check appliance export tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

# The documentation site (mkdocs-material); --strict fails on a broken link or a page
# missing from the nav.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir build/site

test: system-deps venv lint docs
	PATH="/usr/sbin:$$PATH" $(BIN)/pytest -q -ra

demo: system-deps venv
	PATH="/usr/sbin:$$PATH" DATA="$(DATA)" SCENE="$(SCENE)" KEEP="$(KEEP)" bash demo/run.sh

clean:
	rm -rf $(VENV) build .demo
