#!/usr/bin/env bash
# Install everything the engine, the plugin and the tests need on a fresh Debian 12 machine:
#   .venv       engine (pyenv/system CPython 3.11, torch CPU wheel, transformers, rasterio, ...)
#   QGIS 3 desktop from Debian (for `make run`)
#   .venv-qgis  Debian's python3 + QGIS (system site packages, numpy 1.24 untouched) + pytest-qgis
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

need_apt=0
/usr/bin/python3 -c "import qgis.core" >/dev/null 2>&1 || need_apt=1
command -v Xvfb >/dev/null 2>&1 || need_apt=1
command -v qgis >/dev/null 2>&1 || need_apt=1
/usr/bin/python3 -c "import ensurepip" >/dev/null 2>&1 || need_apt=1
if [ "$need_apt" = 1 ]; then
  echo "== installing QGIS from Debian (qgis python3-qgis qgis-providers) =="
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
    qgis python3-qgis qgis-providers python3-venv xvfb
fi

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv (engine) with $PYTHON =="
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
echo "== installing engine requirements =="
.venv/bin/python -m pip install -q -r requirements/engine.txt -r requirements/test.txt
# the engine itself, editable: `.venv/bin/python -m engine` (and `.venv/bin/geovqa-engine`) work
# from any folder, so relative raster paths are the user's own
.venv/bin/python -m pip install -q --no-deps -e .

if [ ! -x .venv-qgis/bin/python ]; then
  echo "== creating .venv-qgis (Debian python3 + QGIS) =="
  /usr/bin/python3 -m venv --system-site-packages .venv-qgis
fi
echo "== installing plugin test requirements =="
# numpy stays Debian's 1.24: GDAL and QGIS are built against it.
.venv-qgis/bin/python -m pip install -q -r requirements/plugin-test.txt -c requirements/plugin-constraints.txt
.venv-qgis/bin/python -c "import numpy, qgis.core; assert numpy.__version__.startswith('1.'), numpy.__version__"
echo "== setup done =="
