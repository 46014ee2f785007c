"""The HTTP/JSON protocol between the GeoVQA engine server and its clients (the QGIS plugin).

This module is the single place the protocol is defined. It uses the standard library only, so
the plugin's tests can load it by file path (the plugin itself never imports the engine) and both
sides are tested against the same definitions. docs/protocol.md explains it for people.

Transport
---------
* Base URL ``http://127.0.0.1:8765`` by default. Every endpoint except ``GET /health`` needs
  ``Authorization: Bearer <token>``; the token lives in ``token_path()`` (mode 0600), created at
  the server's first start. ``/health`` answers without a token but then omits nothing secret.
* Requests and responses are JSON (``application/json``) except the streamed answer of
  ``POST /ask``, which is NDJSON (``application/x-ndjson``): one JSON event per line.
* Errors: HTTP 4xx/5xx with body ``{"error": {"code": <ERROR_CODES>, "message": str,
  "hint": str | null}}``. Messages are written for a person.

Endpoints
---------
``GET  /health``            -> HEALTH_FIELDS
``POST /ask``               body ASK_FIELDS (JSON), or multipart with a ``request`` JSON part and
                            a ``raster`` file part (uploaded GeoTIFF for a remote engine);
                            -> NDJSON stream of EVENT_TYPES events, the last one ``result`` or
                            ``error``.
``POST /batch``             body BATCH_FIELDS -> JOB_FIELDS (``job_id`` and the job's state)
``GET  /jobs/{id}``         -> JOB_FIELDS
``DELETE /jobs/{id}``       -> JOB_FIELDS (state becomes ``cancelled``: at once for a waiting
                            job, after its current answer for a running one; a finished job is
                            left as it is, or with ``?remove=true`` removed: ``removed: true``)
``GET  /jobs/{id}/results`` -> ``{"job_id", "results": [BATCH_RESULT_FIELDS, ...]}``
``GET  /files/{name}``      -> bytes of a heatmap GeoTIFF / anchors GeoJSON the server wrote
                            (for clients on another host; local clients use the paths).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PROTOCOL_VERSION = 1
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
TOKEN_HEADER = "Authorization"
TOKEN_SCHEME = "Bearer"
NDJSON_MEDIA_TYPE = "application/x-ndjson"

# Limits enforced by the server and shown by the client.
MAX_QUESTION_CHARS = 2000
MAX_UPLOAD_BYTES = 2 * 1024**3  # 2 GiB uploaded raster
MAX_BATCH_ITEMS = 10_000

STRATEGIES = ("geollava", "background", "anchored", "pyramid", "budget", "none", "uniform", "random")
DEFAULT_STRATEGY = "geollava"
DEFAULT_TOKENS_PER_TILE = 24  # anchors a tile kept by geollava / anchored, as the released checkpoint


def tokens_per_tile_of(merge_type: object) -> int:
    """MAX_TOKENS of a checkpoint's ``mm_patch_merge_type`` (``unires_max24`` -> 24): the tokens a
    tile it was trained with; DEFAULT_TOKENS_PER_TILE when the name carries no number."""
    text = str(merge_type or "")
    if "max" in text:
        digits = text.rsplit("max", 1)[-1]
        if digits.isdigit() and int(digits) > 0:
            return int(digits)
    return DEFAULT_TOKENS_PER_TILE

# ---------------------------------------------------------------------------------------------
# GET /health
HEALTH_FIELDS = {
    "status": "str: 'ok' | 'error' ('loading' is reserved: this version loads the model "
    "before it listens, so it never answers while loading)",
    "protocol": "int: PROTOCOL_VERSION",
    "version": "str: engine version",
    "model": "str: model name (e.g. 'GeoLLaVA-8K' or 'tiny-demo')",
    "demo_model": "bool: true when running the tiny random demo model (no real weights)",
    "weights_present": "bool: real checkpoint found on disk",
    "weights_dir": "str | null",
    "device": "str: 'cuda:0' | 'cpu'",
    "gpu_name": "str | null",
    "gpu_free_bytes": "int | null",
    "quantization": "str: 'nf4' | 'bf16' | 'fp16' | 'fp32' (the weight format)",
    "four_bit": "bool",
    "compute": "str | null (optional; absent from older engines): the float format the model computes "
    "in, 'bf16' | 'fp16' | 'fp32'; 'fp16' on a GPU without native bfloat16 (compute capability below "
    "8.0), also for nf4, whose 4-bit layers compute in it",
    "attention": "str: 'flash_attention_2' | 'sdpa' | 'eager'",
    "adapter": "str | null: the LoRA adapter folder the engine runs on top of the model (serve "
    "--adapter DIR), null without one",
    "adapter_settings": "dict | null: the visual-token settings that adapter was trained with "
    "(strategy, budget, tokens_per_tile, faithful_empty_slots, bands, records_with_own_bands), "
    "used for every request field left out; null without an adapter or for one without a record",
    "queue_length": "int: jobs waiting for the GPU",
    "max_upload_bytes": "int: largest raster POST /ask accepts as an upload (server setting)",
    "max_read_pixels": "int | null (optional; absent from older engines): the most pixels the engine "
    "reads of any raster window (its largest tiling canvas); a larger window is read decimated. A client "
    "may upload a window larger than this reduced to about this many pixels (aspect kept): the engine "
    "reads it at the same size",
    "feature_cache_bytes": "int | null (optional; absent from older engines): the cap of the "
    "engine's vision-feature cache in RAM (serve --feature-cache-bytes), 0 when it is off; null "
    "when the engine does not say",
    "heartbeat_s": "float | null (optional; absent from older engines): an /ask stream silent "
    "this long gets a heartbeat event (HEARTBEAT_S), so a client may take a longer silence for a "
    "broken connection",
    "strategies": "list[str]",
    "message": "str | null: what the engine is doing or why it failed",
}

# ---------------------------------------------------------------------------------------------
# POST /ask
ASK_FIELDS = {
    "raster_path": "str | null: local path readable by the engine (same host)",
    "question": "str: 1..MAX_QUESTION_CHARS characters, not only whitespace",
    "aoi": "AOI | null: area of interest, see AOI_FIELDS",
    "bands": "list[int] | null: 1-based band numbers, one (shown as grey) or three (red, green, "
    "blue), e.g. [4, 3, 2]; null: the engine's default (the bands tagged red, green and blue, "
    "else the first three non-alpha bands; one band, or two, as grey: the first; a single "
    "paletted 8-bit band through its colour table). The result says which it used",
    "strategy": "str | null: one of STRATEGIES (default: the adapter's, see HEALTH_FIELDS "
    "adapter_settings, else DEFAULT_STRATEGY)",
    "budget": "int | null: hard cap on visual tokens entering the language model (default: the "
    "adapter's, else none)",
    "tokens_per_tile": "int | null: geollava/anchored tokens kept a tile (default: the adapter's, else the checkpoint's own, MAX_TOKENS of its mm_patch_merge_type, 24 for GeoLLaVA-8K)",
    "faithful_empty_slots": "bool | null: geollava sends tokens_per_tile tokens for every tile as the "
    "released checkpoint does, zero vectors for missing clusters (default: the adapter's, else "
    "false: dropped)",
    "max_new_tokens": "int: default 256",
    "seed": "int | null: for strategies with randomness (0 to 2**63 - 1)",
    "request_id": "str | null: client id, echoed in every event; a newer one supersedes",
}
AOI_FIELDS = {
    "window": "[col_off, row_off, width, height] in source pixels, or",
    "polygon_wkt": "str: polygon in the raster's CRS (WKT), or",
    "geojson": "dict: GeoJSON in the raster's CRS: a Polygon/MultiPolygon geometry, a Feature "
    "holding one, or a FeatureCollection (the union of its features' polygons; features without "
    "a geometry are skipped; a point, line or collection without a polygon is bad_aoi); a "
    "legacy 'crs' member naming another CRS has it reprojected into the raster's",
}

# Streamed events: every event is a JSON object with "type" and "request_id".
EVENT_TYPES = {
    "queued": {"position": "int: jobs ahead of this one, the running one included (0 = starts "
               "now); sent again each time it moves up",
               "job_id": "str: id for GET/DELETE /jobs/{id} (also the X-Job-Id header)"},
    "status": {"stage": "str: STAGES", "progress": "float 0..1 | null", "message": "str (one "
               "starting 'note: ' says that the request's visual-token settings differ from "
               "those the loaded adapter was trained with)"},
    "token": {"text": "str: the next piece of the answer"},
    "result": {
        "answer": "str: the whole answer",
        "tokens": "dict: visual_candidates, visual_kept, prompt, generated",
        "timings": "dict: seconds for read, vision, select, prefill (time to first token), "
        "generate, write (the heatmap and anchors files), total",
        "peak_memory_bytes": "int | null: peak GPU (or CPU RSS) memory",
        "cache": "dict: features (bool hit), kv_prefix (bool hit)",
        "heatmap_path": "str: GeoTIFF of token scores, source CRS/transform, nodata = pruned",
        "heatmap_file": "str: name for GET /files/{name}",
        "anchors_path": "str: GeoJSON FeatureCollection of kept-token footprints",
        "anchors_file": "str: name for GET /files/{name}",
        "anchors": "dict: the same GeoJSON FeatureCollection inline",
        "crs_wkt": "str | null: CRS of heatmap and anchors (the raster's)",
        "bands": "list[int] | null: the 1-based source band the model saw as red, green and "
        "blue, e.g. [4, 3, 2]; one band shown as grey is [b, b, b] (the request's bands, else the "
        "engine's default choice); null when not known",
        "palette": "bool: true when the colour table of that one band gave the colours "
        "(bands is then [b, b, b]); false otherwise",
        "strategy": "str",
        "stopped": "str: why the answer ended: 'stop' (the end token), 'length' (max_new_tokens "
        "reached), 'cancelled'",
        "budget": "int | null",
    },
    "error": {"code": "str: ERROR_CODES", "message": "str", "hint": "str | null",
              "retry_budget": "int (out_of_memory only): a smaller budget to retry with"},
    "heartbeat": {"job_id": "str: the question's job; nothing else happened: the engine sends it "
                  "after HEARTBEAT_S seconds without another event (queued behind a long job, a "
                  "long prefill on the CPU), so a silent stream is not a dead one; ignore it"},
}
# seconds of silence after which an /ask stream gets a heartbeat event (GEOVQA_HEARTBEAT_S sets
# another, e.g. for tests); /health says it as heartbeat_s
HEARTBEAT_S = 15.0
HEARTBEAT_ENV = "GEOVQA_HEARTBEAT_S"
# the /ask response header saying that interval, so a client knows before the first event how
# long a silence means a broken stream
HEARTBEAT_HEADER = "X-Heartbeat-S"


def heartbeat_interval() -> float:
    """HEARTBEAT_S, or the positive number of seconds in GEOVQA_HEARTBEAT_S (ValueError for
    anything else)."""
    from engine.env_settings import env_number, positive_number

    return env_number(HEARTBEAT_ENV, HEARTBEAT_S, positive_number, "a positive number of seconds")


STAGES = ("queued", "read", "tile", "vision", "select", "prefill", "generate", "write", "done")

# Anchor feature properties (GeoJSON Feature.properties) of each kept token.
ANCHOR_PROPERTIES = {
    "rank": "int: order in which the token enters the LM",
    "score": "float: strategy score",
    "role": "str: 'anchor' | 'kept' | 'merged'",
    "tile": "int: tile index (row-major)",
    "n_patches": "int: patches the token stands for",
}

# ---------------------------------------------------------------------------------------------
# POST /batch, GET/DELETE /jobs/{id}
BATCH_FIELDS = {
    "items": "list[{'layer': str (display name), 'raster_path': str, 'aoi': AOI | null, "
    "'bands': list[int] | null (as ASK_FIELDS)}]: BATCH_ITEM_FIELDS",
    "questions": "list[str]",
    "strategy": "str", "budget": "int | null", "tokens_per_tile": "int | null",
    "max_new_tokens": "int", "faithful_empty_slots": "bool",
    "seed": "int: for strategies with randomness (default 0)",
}
# the fields of one of BATCH_FIELDS' items; a body or item with any other field is refused
BATCH_ITEM_FIELDS = {
    "layer": "str | null: display name (default: the raster file's name without its suffix)",
    "raster_path": "str: local path readable by the engine (same host)",
    "aoi": "AOI | null: as ASK_FIELDS",
    "bands": "list[int] | null: as ASK_FIELDS",
}
JOB_STATES = ("queued", "running", "done", "failed", "cancelled")
JOB_FIELDS = {
    "job_id": "str", "state": "str: JOB_STATES", "position": "int | null: place in queue",
    "done": "int: answers completed", "total": "int: layers x questions",
    "errors": "int", "results_path": "str: JSONL file on the engine host",
    "message": "str | null",
    "kind": "str: 'batch' | 'ask' (a running /ask question can be looked up and cancelled too)",
}
BATCH_RESULT_FIELDS = {
    "index": "int", "layer": "str", "raster_path": "str", "question": "str",
    "answer": "str | null", "error": "str | null", "heatmap_path": "str | null",
    "anchors_path": "str | null", "tokens": "dict", "timings": "dict",
    "bands": "list[int] | null: as the result event's (null when the item failed)",
    "palette": "bool | null: as the result event's (null when the item failed)",
}

ERROR_CODES = {
    "unauthorized": 401,
    "bad_request": 400,
    "unknown_strategy": 400,
    "empty_question": 400,
    "question_too_long": 400,
    "bad_aoi": 400,
    "aoi_outside_raster": 400,
    "not_a_raster": 400,
    "raster_unreadable": 422,
    "no_valid_pixels": 422,
    "upload_too_large": 413,
    "not_found": 404,
    "method_not_allowed": 405,
    "out_of_memory": 507,
    "cancelled": 499,
    "model_loading": 503,
    "no_weights": 503,
    "internal": 500,
}
# Codes clients understand but this engine version never sends: `serve` loads the model (or
# fails with "error: no weights ...") before it listens, so a client cannot reach an engine
# that is still loading or has no weights; it sees a refused connection instead.
RESERVED_ERROR_CODES = ("model_loading", "no_weights")


def error_body(code: str, message: str, hint: str | None = None) -> dict:
    """The JSON body of an error response (and the payload of an ``error`` event)."""
    if code not in ERROR_CODES:
        raise ValueError(f"unknown error code {code!r}")
    return {"error": {"code": code, "message": message, "hint": hint}}


def validate_question(question: object) -> str:
    """Return the stripped question or raise ValueError with a code-prefixed message."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError("empty_question: Please type a question.")
    question = question.strip()
    if not question.replace("<image>", "").strip():  # the prompt's image placeholder, which the prompt drops
        raise ValueError("empty_question: The question holds only <image>, the image's place in the "
                         "prompt; please type a question.")
    try:
        question.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: a byte that is not UTF-8, as sys.argv keeps it
        raise ValueError("bad_request: The question has characters that are not valid text "
                         "(bytes that are not UTF-8); type it in a UTF-8 terminal or editor.") from None
    if len(question) > MAX_QUESTION_CHARS:
        raise ValueError(
            f"question_too_long: The question has {len(question)} characters; "
            f"the limit is {MAX_QUESTION_CHARS}."
        )
    return question


# kind -> (Windows variable, its fallback under the home folder, XDG variable, its fallback)
_USER_DIRS = {
    "config": ("APPDATA", ("AppData", "Roaming"), "XDG_CONFIG_HOME", (".config",)),
    "data": ("LOCALAPPDATA", ("AppData", "Local"), "XDG_DATA_HOME", (".local", "share")),
}


def user_dir(kind: str) -> Path:
    """The user's base folder of `kind` ('config' or 'data') by platform conventions."""
    win_var, win_default, xdg_var, xdg_default = _USER_DIRS[kind]
    if sys.platform.startswith("win"):
        return Path(os.environ.get(win_var, Path.home().joinpath(*win_default)))
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support"
    return Path(os.environ.get(xdg_var, Path.home().joinpath(*xdg_default)))


def config_dir() -> Path:
    """The user's config dir for the engine (token, settings), per platform conventions."""
    override = os.environ.get("GEOVQA_CONFIG_DIR")
    return Path(override) if override else user_dir("config") / "geovqa"


def token_path() -> Path:
    """Where the server keeps its bearer token (mode 0600)."""
    return config_dir() / "token"
