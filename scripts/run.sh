#!/usr/bin/env bash
# `make run`: start the GeoVQA engine, then QGIS with the plugin installed in a throwaway profile
# that already knows the engine URL and token.
#
#   * Real weights are used when weights/GeoLLaVA-8K holds a checkpoint (config.json + *.safetensors;
#     get them with `make weights`; a damaged one stops with the engine's reason). When the folder
#     is missing or empty, the tiny RANDOM demo model is built into
#     .cache/tiny-geollava and used: its answers are meaningless, it only shows the workflow.
#     A checkpoint folder named by WEIGHTS (make run WEIGHTS=...) or GEOVQA_WEIGHTS is used as it
#     is: one that is missing or empty stops with the engine's reason, never the demo model.
#   * The engine listens on 127.0.0.1:$PORT (default 8765, or the next free port), keeps its token
#     and state in .cache/run/, and its log in .cache/run/engine.log. It is stopped when this script
#     ends (closing QGIS, or Ctrl-C when QGIS is not installed).
#   * QGIS runs with --profiles-path .cache/run/qgis-profiles --profile geovqa, so your own QGIS
#     profile is never touched.
#
# Environment: PORT, WEIGHTS (checkpoint dir; else GEOVQA_WEIGHTS), PY (engine python, default .venv/bin/python),
# QGIS_BIN (default: `qgis` on PATH), NO_QGIS=1 (engine only), ENGINE_ARGS (extra serve args).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PY:-.venv/bin/python}
# a folder the user named (WEIGHTS, else the engine's GEOVQA_WEIGHTS) is used as it is
if [ -n "${WEIGHTS:-}" ]; then NAMED_WEIGHTS=$WEIGHTS; NAMED_BY=WEIGHTS
else NAMED_WEIGHTS=${GEOVQA_WEIGHTS:-}; NAMED_BY=GEOVQA_WEIGHTS; fi

DEFAULT_WEIGHTS=weights/GeoLLaVA-8K
TINY=.cache/tiny-geollava
RUN=.cache/run
PORT=${PORT:-8765}
mkdir -p "$RUN"

say() { printf '\n== %s\n' "$*"; }
die() { printf '\nERROR: %s\n' "$*" >&2; exit 1; }

[ -x "$PY" ] || die "$PY not found. Run 'make setup' first (it creates .venv with the engine)."
PY_ABS=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
"$PY" -c "import engine.server" 2>/dev/null || die "The engine in $PY cannot start a server (import engine.server failed). Run 'make setup'."
# the default folder named is the default folder: used when it holds a checkpoint, else the demo
# model, said by the banner (the engine too takes it as not given when it holds none)
same_folder() { "$PY" -c 'import os, sys; sys.exit(os.path.realpath(sys.argv[1]) != os.path.realpath(sys.argv[2]))' "$1" "$2"; }
if [ -n "$NAMED_WEIGHTS" ] && same_folder "$NAMED_WEIGHTS" "$DEFAULT_WEIGHTS"; then NAMED_WEIGHTS=; fi

has_weights() { [ -f "$1/config.json" ] && ls "$1"/*.safetensors >/dev/null 2>&1; }
# the engine's rule (engine/loader.py checkpoint_started): a folder holding anything but hidden
# entries (an interrupted download's .cache) is meant as a checkpoint; a damaged one is reported
# by the engine with what is wrong, never replaced by the demo model
weights_started() { [ -e "$1" ] && { [ ! -d "$1" ] || [ -n "$(ls -A "$1" 2>/dev/null | grep -v '^\.' || true)" ]; }; }
if [ -n "$NAMED_WEIGHTS" ]; then
  MODEL_DIR=$NAMED_WEIGHTS
  say "Using the checkpoint in $NAMED_WEIGHTS (named by $NAMED_BY)"
elif weights_started "$DEFAULT_WEIGHTS"; then
  MODEL_DIR=$DEFAULT_WEIGHTS
  say "Using the GeoLLaVA-8K checkpoint in $DEFAULT_WEIGHTS"
else
  if ! has_weights "$TINY"; then
    say "Building the tiny demo model in $TINY"
    "$PY" -m engine tiny --dest "$TINY"
  fi
  MODEL_DIR=$TINY
  cat <<'BANNER'

  ###########################################################################
  #  NO REAL WEIGHTS FOUND (weights/GeoLLaVA-8K is missing or empty).       #
  #  Running the TINY RANDOM DEMO MODEL: answers are gibberish, heatmaps    #
  #  show the workflow only. Get the real model with `make weights`.        #
  ###########################################################################

BANNER
fi

port_free() { "$PY" - "$1" <<'PYEOF'
import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
finally:
    s.close()
PYEOF
}
for _ in $(seq 1 20); do port_free "$PORT" && break; PORT=$((PORT + 1)); done
port_free "$PORT" || die "No free port found near $PORT."
URL="http://127.0.0.1:$PORT"

export GEOVQA_CONFIG_DIR="$ROOT/$RUN/config"
say "Starting the engine on $URL (log: $RUN/engine.log)"
# shellcheck disable=SC2086
"$PY" -m engine serve --weights "$MODEL_DIR" --port "$PORT" --state-dir "$RUN/state" ${ENGINE_ARGS:-} \
  >"$RUN/engine.log" 2>&1 &
ENGINE_PID=$!
cleanup() {
  if kill -0 "$ENGINE_PID" 2>/dev/null; then
    say "Stopping the engine (pid $ENGINE_PID)"
    kill "$ENGINE_PID" 2>/dev/null || true
    wait "$ENGINE_PID" 2>/dev/null || true
  fi
}
trap cleanup EXIT INT TERM

printf 'waiting for the model to load'
for _ in $(seq 1 600); do
  kill -0 "$ENGINE_PID" 2>/dev/null || { tail -n 40 "$RUN/engine.log" >&2; die "The engine exited while starting (log above). Options for 'engine serve' go in ENGINE_ARGS, e.g. make run ENGINE_ARGS='--quantization nf4'."; }
  status=$("$PY" - "$URL" <<'PYEOF' 2>/dev/null || true
import json, sys, urllib.request
# straight to the engine on loopback: an http_proxy of the shell must not carry this request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
print(json.load(opener.open(sys.argv[1] + "/health", timeout=2)).get("status", ""))
PYEOF
)
  [ "$status" = ok ] && break
  [ "$status" = error ] && { tail -n 40 "$RUN/engine.log" >&2; die "The engine reports an error (log above)."; }
  printf '.'; sleep 1
done
echo
[ "${status:-}" = ok ] || die "The engine did not become ready in 10 minutes; see $RUN/engine.log."
say "Engine ready: $URL  (token file: $GEOVQA_CONFIG_DIR/token)"

if [ -z "${QGIS_BIN:-}" ]; then
  QGIS_BIN=$(command -v qgis || true)
  if [ -z "${NO_QGIS:-}" ] && [ -n "$QGIS_BIN" ] && [ "$(uname -s)" = Linux ] && [ -z "${DISPLAY:-}${WAYLAND_DISPLAY:-}" ]; then
    echo "No display (DISPLAY/WAYLAND_DISPLAY unset): QGIS cannot open a window here."
    echo "Run 'make run' from a desktop session, or over 'ssh -X'."
    NO_DISPLAY=1
  fi
fi
if [ -n "${NO_QGIS:-}${NO_DISPLAY:-}" ] || [ -z "$QGIS_BIN" ]; then
  if [ -z "$QGIS_BIN" ]; then
    echo "QGIS is not installed on this machine (no 'qgis' on PATH); install it with"
    echo "'sudo apt-get install qgis' (Debian/Ubuntu) and run 'make run' again, or use your own QGIS:"
  elif [ -n "${NO_DISPLAY:-}" ]; then
    echo "Engine only. To use it from a QGIS elsewhere on this computer:"
  else
    echo "NO_QGIS is set: engine only. To use it from your own QGIS:"
  fi
  cat <<EOF2
  * 'make install-plugin', enable GeoVQA in Plugins > Manage and Install Plugins,
  * in Settings > Options > GeoVQA set Engine URL = $URL and
    Token file = $GEOVQA_CONFIG_DIR/token.
The engine keeps running here; press Ctrl-C to stop it.
EOF2
  wait "$ENGINE_PID"
  exit 0
fi

PROFILES="$ROOT/$RUN/qgis-profiles"
PROFILE="$PROFILES/profiles/geovqa"
"$PY" scripts/package_plugin.py --out "$RUN/dist" --install --profile-dir "$PROFILE" >/dev/null
mkdir -p "$PROFILE/QGIS"
# QGIS 3 reads the profile's QGIS/QGIS3.ini, QGIS 4 its QGIS/QGIS4.ini: both get the settings
for INI in "$PROFILE/QGIS/QGIS3.ini" "$PROFILE/QGIS/QGIS4.ini"; do
"$PY" - "$INI" "$URL" "$GEOVQA_CONFIG_DIR/token" "$PY_ABS" "$ROOT" "$(cd "$MODEL_DIR" && pwd)" <<'PYEOF'
import configparser, sys
ini, url, token_file, python, root, weights = sys.argv[1:]
cp = configparser.RawConfigParser()
cp.optionxform = str
cp.read(ini)
for section, values in {
    "PythonPlugins": {"geovqa": "true"},
    "geovqa": {"engine_url": url, "token_file": token_file, "python": python, "engine_dir": root,
               "weights_dir": weights},
}.items():
    if not cp.has_section(section):
        cp.add_section(section)
    for k, v in values.items():
        cp.set(section, k, v)
with open(ini, "w") as fh:
    cp.write(fh, space_around_delimiters=False)
PYEOF
done
say "Starting QGIS ($QGIS_BIN) with the GeoVQA plugin (profile $PROFILE)"
"$QGIS_BIN" --profiles-path "$PROFILES" --profile geovqa "$@" || true
