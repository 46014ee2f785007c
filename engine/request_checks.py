"""Checks of request bodies, shared by the HTTP server and `python -m engine ask`.

Each `validate_*` turns a protocol body (engine/protocol.py ASK_FIELDS, BATCH_FIELDS) into
checked fields or raises `JobError` with the protocol error code and a sentence for a person;
`request_factory` turns checked /ask fields into the engine's AskRequest.
Everything here runs before a question is queued or a model is loaded: it opens the raster
read-only (`check_raster_file`; once per raster in a batch, however many items name it) but
reads no pixels beyond one.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from engine import protocol
from engine.jobs import JobError
from engine.uploads import RasterInfo, check_raster_file

MAX_NEW_TOKENS_LIMIT = 4096

MAX_SEED = 2**63 - 1  # the random generators (torch, numpy) take a 64-bit seed


def _int_field(body: dict, name: str, *, low: int, high: int | None = None,
               default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise JobError("bad_request", f"'{name}' must be a whole number, not {value!r}.")
    if value < low or (high is not None and value > high):
        limit = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise JobError("bad_request", f"'{name}' must be {limit}; it is {value}.")
    return value


def _bool_field(body: dict, name: str, default: bool | None = False) -> bool | None:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise JobError("bad_request", f"'{name}' must be true or false, not {value!r}.")
    return value


def validate_strategy(value: Any, known: tuple[str, ...]) -> str:
    strategy = protocol.DEFAULT_STRATEGY if value is None else value
    if not isinstance(strategy, str) or strategy not in known:
        raise JobError("unknown_strategy", f"Unknown strategy {strategy!r}. "
                       f"Choose one of: {', '.join(known)}.")
    return strategy


def validate_question(value: Any) -> str:
    try:
        return protocol.validate_question(value)
    except ValueError as exc:
        code, _, message = str(exc).partition(": ")
        raise JobError(code, message) from None


def _is_finite_number(value: Any) -> bool:
    """A JSON number that fits a float and is neither NaN nor infinite (bool is not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float, such as 10**400
        return False


def validate_aoi(aoi: Any, info: RasterInfo) -> dict | None:
    """Check an AOI against the raster; returns it unchanged when usable.

    A ``geojson`` AOI (a Polygon/MultiPolygon geometry, a Feature or a FeatureCollection) is
    read by the raster reader's own `engine.area_of_interest.geojson_area`, so what passes here
    is what the reader reads; one whose legacy ``"crs"`` member names another CRS is checked
    reprojected into the raster's, as the reader reads it (engine/aoi_crs.py)."""
    if aoi is None:
        return None
    if not isinstance(aoi, dict) or not aoi:
        raise JobError("bad_aoi", "The area of interest must be an object with 'window', "
                       "'polygon_wkt' or 'geojson'.")
    keys = [k for k in ("window", "polygon_wkt", "geojson") if aoi.get(k) is not None]
    if len(keys) != 1:
        raise JobError("bad_aoi", "Give exactly one of 'window', 'polygon_wkt' or 'geojson' "
                       "for the area of interest.")
    if keys[0] == "window":
        win = aoi["window"]
        if (not isinstance(win, (list, tuple)) or len(win) != 4
                or not all(_is_finite_number(v) for v in win)):
            raise JobError("bad_aoi", "The window must be [col_off, row_off, width, height] in "
                           "pixels, four finite numbers.")
        col, row, width, height = win
        if width <= 0 or height <= 0:
            raise JobError("bad_aoi", f"The window {list(win)} has no area; width and height "
                           "must be positive.")
        if col >= info.width or row >= info.height or col + width <= 0 or row + height <= 0:
            raise JobError("aoi_outside_raster",
                           f"The window {list(win)} lies outside the raster, which is "
                           f"{info.width} x {info.height} pixels.",
                           "Pick an area inside the layer's extent.")
        return aoi
    from shapely import wkt as shapely_wkt
    from shapely.geometry import box

    from engine.aoi_crs import in_raster_crs
    from engine.area_of_interest import check_polygon, geojson_area, polygonal_area
    from engine.raster_errors import AOIError

    try:
        if keys[0] == "geojson":  # a geometry, a Feature or a FeatureCollection: as the reader
            geom, _ = in_raster_crs(geojson_area(aoi["geojson"]), aoi["geojson"], info.crs_wkt)
        else:
            try:
                geom = shapely_wkt.loads(aoi["polygon_wkt"])
            except Exception as exc:  # noqa: BLE001 - shapely raises several kinds
                raise JobError("bad_aoi", "The area of interest is not a valid geometry: "
                               f"{exc}") from None
            check_polygon(geom)
        # as the reader does: a self-intersecting ring made valid (GEOS cannot intersect it
        # with the extent below), one that encloses nothing refused
        geom = polygonal_area(geom)
    except AOIError as exc:
        raise JobError("bad_aoi", str(exc)) from None
    left, bottom, right, top = info.bounds
    # an area that only touches the raster's edge or corner holds no pixel: the reader refuses it
    # (after the question was queued and the model loaded), so it is refused here too
    extent = box(min(left, right), min(bottom, top), max(left, right), max(bottom, top))
    if not geom.intersects(extent) or geom.intersection(extent).area <= 0:
        raise JobError("aoi_outside_raster", "The area of interest does not overlap the raster.",
                       "Draw the area inside the layer's extent (in the layer's CRS).")
    return aoi


def validate_bands(value: Any, info: RasterInfo) -> list[int] | None:
    if value is None:
        return None
    if (not isinstance(value, list) or not value
            or not all(isinstance(b, int) and not isinstance(b, bool) for b in value)):
        raise JobError("bad_request", "'bands' must be a list of band numbers (1-based).")
    if len(value) not in (1, 3):
        raise JobError("bad_request", f"'bands' must name one band (shown as grey) or three "
                       f"(red, green, blue); it names {len(value)}.")
    bad = [b for b in value if b < 1 or b > info.count]
    if bad:
        raise JobError("bad_request", f"Band(s) {bad} do not exist; the raster has "
                       f"{info.count} band(s).")
    from engine.band_choice import alpha_choice_problem  # noqa: PLC0415 - numpy; the server has it loaded

    problem = alpha_choice_problem(value, info.alpha)
    if problem:
        raise JobError("bad_request", problem[0].upper() + problem[1:] + ".")
    return value


def validate_common(body: dict, known: tuple[str, ...]) -> dict:
    """Fields shared by /ask and /batch (model settings)."""
    # strategy and faithful_empty_slots stay None when not given, as budget, tokens_per_tile and
    # bands do: the engine then uses the loaded adapter's training settings, else its defaults
    return {
        "strategy": None if body.get("strategy") is None else validate_strategy(body.get("strategy"), known),
        "budget": _int_field(body, "budget", low=1),
        "tokens_per_tile": _int_field(body, "tokens_per_tile", low=1, high=576),
        "max_new_tokens": _int_field(body, "max_new_tokens", low=1, high=MAX_NEW_TOKENS_LIMIT,
                                     default=256),
        "seed": _int_field(body, "seed", low=0, high=MAX_SEED, default=0),
        "faithful_empty_slots": _bool_field(body, "faithful_empty_slots", default=None),
    }


def _refuse_unknown_fields(body: dict, allowed: Any, said: str, hint: str) -> None:
    """JobError("bad_request", "<said>: 'a', 'b'.") when `body` has keys not in `allowed`."""
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        named = ", ".join(repr(name[:40]) for name in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise JobError("bad_request", f"{said}: {named}.", f"{hint} {', '.join(allowed)}.")


def validate_ask(body: Any, known: tuple[str, ...], raster_path: str | None = None) -> dict:
    """Turn an ASK_FIELDS body into checked fields, or raise JobError (4xx)."""
    if not isinstance(body, dict):
        raise JobError("bad_request", "The request body must be a JSON object.")
    # a misspelt field ("budjet") would be dropped without a word, and the engine's own fields
    # (AskRequest.raster_identity, selection_text) are not the client's to set
    _refuse_unknown_fields(body, protocol.ASK_FIELDS, "Unknown request fields",
                           "Leave them out; a question takes only")
    question = validate_question(body.get("question"))
    fields = validate_common(body, known)
    path = raster_path if raster_path is not None else body.get("raster_path")
    if not isinstance(path, str) or not path.strip():
        raise JobError("bad_request", "Give 'raster_path' (a file on the engine's computer) or "
                       "upload the raster as a GeoTIFF.")
    info = check_raster_file(path)
    request_id = body.get("request_id")
    if request_id is not None and (not isinstance(request_id, str) or len(request_id) > 200):
        raise JobError("bad_request", "'request_id' must be a string of at most 200 characters.")
    fields.update(
        raster_path=info.path, question=question, aoi=validate_aoi(body.get("aoi"), info),
        bands=validate_bands(body.get("bands"), info), request_id=request_id,
    )
    return fields


def validate_batch(body: Any, known: tuple[str, ...]) -> dict:
    """Turn a BATCH_FIELDS body into a checked job spec, or raise JobError (4xx)."""
    if not isinstance(body, dict):
        raise JobError("bad_request", "The request body must be a JSON object.")
    # as in validate_ask: a misspelt field ("budjet", "question") would be dropped without a word
    _refuse_unknown_fields(body, protocol.BATCH_FIELDS, "Unknown request fields",
                           "Leave them out; a batch takes only")
    items, questions = body.get("items"), body.get("questions")
    if not isinstance(items, list) or not items:
        raise JobError("bad_request", "'items' must be a non-empty list of layers.")
    if not isinstance(questions, list) or not questions:
        raise JobError("bad_request", "'questions' must be a non-empty list of questions.")
    if len(items) * len(questions) > protocol.MAX_BATCH_ITEMS:
        raise JobError("bad_request", f"A batch may hold at most {protocol.MAX_BATCH_ITEMS} "
                       f"answers; this one asks for {len(items) * len(questions)}.")
    spec = validate_common(body, known)
    spec["questions"] = [validate_question(q) for q in questions]
    checked = []
    infos: dict[str, RasterInfo] = {}  # each raster is opened once, however many items name it
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise JobError("bad_request", f"Item {i + 1} must be an object with 'raster_path'.")
        _refuse_unknown_fields(item, protocol.BATCH_ITEM_FIELDS, f"Unknown fields in item {i + 1}",
                               "Leave them out; an item takes only")
        layer = item.get("layer")
        layer = layer if isinstance(layer, str) and layer.strip() else None
        named = f"Layer {layer}" if layer else f"Item {i + 1}"  # how its errors name it
        path = item.get("raster_path")
        if not isinstance(path, str) or not path.strip():
            raise JobError("bad_request", f"{named} has no 'raster_path'.")
        try:
            info = infos.get(path)
            if info is None:
                info = infos[path] = check_raster_file(path)
            aoi = validate_aoi(item.get("aoi"), info)
            bands = validate_bands(item.get("bands"), info)
        except JobError as exc:
            raise JobError(exc.code, f"{named}: {exc.message}", exc.hint) from None
        layer = layer or Path(path).stem
        checked.append({"layer": layer, "raster_path": info.path, "aoi": aoi, "bands": bands})
    spec["items"] = checked
    return spec


def request_factory(engine: Any):
    """A function turning validated fields into the engine's AskRequest."""
    cls = getattr(engine, "request_type", None)
    if cls is None:
        from engine.pipeline import AskRequest as cls  # light: heavy imports there are lazy
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else None

    def make(fields: dict) -> Any:
        kwargs = {k: v for k, v in fields.items() if v is not None}
        if names is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in names}
        return cls(**kwargs)

    return make
