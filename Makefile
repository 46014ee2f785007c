# GeoVQA for QGIS: engine + plugin. `make setup` then `make test` on a fresh machine.
PY      ?= .venv/bin/python
QPY     ?= .venv-qgis/bin/python
WEIGHTS ?= weights/GeoLLaVA-8K
export PYTHONDONTWRITEBYTECODE = 1

.PHONY: setup test test-engine test-plugin run serve bench weights tiny package install-plugin clean

setup:
	bash scripts/setup.sh

test: test-engine test-plugin

test-engine:
	$(PY) -m pytest tests/engine -q -p no:cacheprovider

test-plugin:
	QT_QPA_PLATFORM=offscreen $(QPY) -m pytest tests/plugin -q -p no:cacheprovider

# Engine + QGIS with the plugin; uses the tiny demo model when no weights are present (and says so).
run:
	bash scripts/run.sh

serve:
	$(PY) -m engine serve --weights $(WEIGHTS)

bench:
	$(PY) -m engine.bench

weights:
	$(PY) -m engine weights --dest $(WEIGHTS)

tiny:
	$(PY) -m engine tiny --dest .cache/tiny-geollava

package:
	$(PY) scripts/package_plugin.py --out dist

install-plugin: package
	$(PY) scripts/package_plugin.py --install

clean:
	rm -rf dist build .cache .pytest_cache
